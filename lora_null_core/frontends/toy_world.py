"""The demo's toy world, built locally: tiny models of several architectures with random weights (from configs,
no hub), a word-level tokenizer, and synthetic knowledge and arithmetic texts. The tests and the synthetic benchmark
reuse it."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "gpt2")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
)

_FIRST = ["Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kaito", "Lena"]
_LAST = ["Varga", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Reyes", "Novak", "Haddad", "Costa", "Berg"]
_CITIES = ["Lisbon", "Kraków", "Osaka", "Quito", "Tunis", "Tartu", "Perth", "Bergen", "Leipzig", "Cusco"]
_FIELDS = ["chemistry", "music", "geology", "law", "poetry", "medicine", "physics", "history"]
_TEMPLATES = [
    "{name} was born in {city} .",
    "{name} studied {field} .",
    "The birthplace of {name} is {city} .",
    "{name} is known for work in {field} .",
    "Where was {name} born ? In {city} .",
    "What did {name} study ? {field} .",
]


def knowledge_texts(count: int, seed: int = 0) -> list[str]:
    """Short factual sentences about fictional people: stand-in 'pre-trained knowledge' text."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        facts = [rng.choice(_TEMPLATES).format(name=name, city=rng.choice(_CITIES), field=rng.choice(_FIELDS))]
        facts += [rng.choice(_TEMPLATES).format(name=name, city=rng.choice(_CITIES), field=rng.choice(_FIELDS))]
        texts.append(" ".join(facts))
    return texts


def arithmetic_texts(count: int, seed: int = 1) -> list[str]:
    """A different skill for fine-tuning: small sums written out."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        texts.append(f"Question : what is {a} plus {b} ? Answer : {a + b} .")
    return texts


def tiny_tokenizer(texts: Iterable[str] = ()):
    """A word-level fast tokenizer over the given texts plus digits and the demo vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = set(str(d) for d in range(100))
    words.update(_FIRST + _LAST + _CITIES + _FIELDS + ["system", "user", "assistant", ":", "?", ".", ","])
    splitter = pre_tokenizers.Whitespace()
    for text in list(texts) + _TEMPLATES + arithmetic_texts(20):
        words.update(word for word, _ in splitter.pre_tokenize_str(text))
    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + sorted(words - set(SPECIAL_TOKENS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(architecture: str, vocab_size: int, hidden: int = 64, layers: int = 2):
    """A small config of a real architecture: GQA where the family has it, Conv1D for gpt2."""
    from transformers import AutoConfig

    if architecture == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=2,
            eos_token_id=3,
        )
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    extra = {"head_dim": hidden // 4} if architecture == "gemma" else {}
    return AutoConfig.for_model(
        architecture,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=architecture == "gemma",
        **extra,
    )


def tiny_model(architecture: str = "llama", vocab_size: int = 256, seed: int = 0, **sizes):
    """Random-weight causal LM from `tiny_config`, in float32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, vocab_size, **sizes))
    return model.float().eval()


def write_jsonl(path, texts: Sequence[str], field: str = "text") -> None:
    import json

    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({field: text}) + "\n")
