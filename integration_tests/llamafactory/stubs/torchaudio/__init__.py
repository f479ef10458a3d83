"""Test-only stand-in: LLaMA-Factory 0.9.5 imports torchaudio unconditionally (data/mm_plugin.py), and no CPU
torchaudio wheel matches the CPU torch these tests use. Text-only LoRA training never calls it."""


def __getattr__(name):
    raise ImportError(f"torchaudio is a test stub here; torchaudio.{name} is unavailable")
