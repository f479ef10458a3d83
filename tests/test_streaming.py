"""Block-by-block calibration gives the whole-model pass's result (the init leaves each block's function intact)."""

import pytest
import torch
from peft import LoraConfig

from lora_null_core import UnsupportedModelError, lora_null_init
from lora_null_core.frontends.toy_world import ARCHITECTURES
from lora_null_core.init.peft_layers import lora_layers

from .conftest import logits, relative_error

SETTINGS = dict(num_samples=160, holdout_samples=40, batch_size=16, accumulate_dtype="float64")


def init(make_model, tokenizer, texts, architecture, streaming):
    model = make_model(architecture, layers=3)
    return lora_null_init(model, LoraConfig(r=4, lora_alpha=8), texts, tokenizer, streaming=streaming, **SETTINGS)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_streaming_matches_the_whole_model_pass(make_model, tokenizer, knowledge, task, architecture):
    texts = knowledge[:150] + task[:50]  # enough distinct tokens for well-separated null spaces
    streamed = init(make_model, tokenizer, texts, architecture, "on")
    whole = init(make_model, tokenizer, texts, architecture, "off")
    assert streamed.lora_null_report.function_error_measure == "last_block_output"
    assert whole.lora_null_report.function_error_measure == "logits"
    assert streamed.lora_null_report.function_error < 1e-5
    for (name, s_layer), (_, w_layer) in zip(
        lora_layers(streamed, "default").items(), lora_layers(whole, "default").items(), strict=True
    ):
        s_delta = s_layer.lora_B["default"].weight @ s_layer.lora_A["default"].weight
        w_delta = w_layer.lora_B["default"].weight @ w_layer.lora_A["default"].weight
        assert (s_delta - w_delta).norm() <= 1e-4 * w_delta.norm(), name
        assert torch.allclose(s_layer.get_base_layer().weight, w_layer.get_base_layer().weight, atol=1e-5), name
    for s_entry, w_entry in zip(streamed.lora_null_report.layers, whole.lora_null_report.layers, strict=True):
        assert s_entry.name == w_entry.name and s_entry.tokens == w_entry.tokens
        assert s_entry.leakage_holdout == pytest.approx(w_entry.leakage_holdout, rel=1e-3, abs=1e-6)
    ids = tokenizer(knowledge[-2:], return_tensors="pt", padding=True)
    assert relative_error(logits(streamed, **ids), logits(whole, **ids)) < 1e-5


def test_streaming_on_refuses_targets_outside_the_blocks(make_model, tokenizer, knowledge):
    model = make_model()
    model.model.projector = torch.nn.Linear(64, 64)  # a linear layer outside the decoder blocks
    original_forward = model.model.norm.forward
    model.model.norm.forward = lambda hidden: model.model.projector(original_forward(hidden))
    lora = LoraConfig(r=4, target_modules=["q_proj", "projector"])
    with pytest.raises(UnsupportedModelError, match="streaming"):
        lora_null_init(model, lora, knowledge, tokenizer, streaming="on", **SETTINGS)
    # auto falls back to the whole-model pass and still initializes every target.
    model = lora_null_init(model, lora, knowledge, tokenizer, streaming="auto", **SETTINGS)
    assert model.lora_null_report.function_error_measure == "logits"
    assert any(name.endswith("projector") for name in lora_layers(model, "default"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="prefetching streams CPU-held blocks to a GPU")
def test_prefetched_offload_gives_the_same_init_as_plain_moves(make_model, tokenizer, knowledge):
    """--offload cpu on a GPU: blocks copied in on a side stream (pinned) while the previous one computes, and
    copied home the same way. The residual base and the factors must equal those of synchronous moves."""
    from lora_null_core.init import block_loaders

    results = []
    for loader in (block_loaders.MoveToDevice(), None):  # None: the default, PrefetchToDevice here
        model = make_model("llama")
        peft_model = lora_null_init(
            model,
            LoraConfig(r=4, lora_alpha=8),
            knowledge[:200],
            tokenizer,
            num_samples=160,
            holdout_samples=0,
            streaming="on",
            execution_device="cuda",
            block_loader=loader,
        )
        assert all(p.device.type == "cpu" for p in peft_model.parameters())  # every block went home
        results.append({k: v.detach().clone() for k, v in peft_model.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.allclose(results[0][key], results[1][key], atol=1e-5), key


def test_the_init_announces_disjoint_phases_an_observer_can_time(make_model, tokenizer, knowledge):
    """The profiler's view (benchmarks/speed): every phase begins and ends before the next one begins, and a
    streaming init goes through all of them; after the block, observers hear nothing."""
    from lora_null_core.init import phases

    class Recorder:
        def __init__(self):
            self.events = []

        def begin(self, name):
            self.events.append(("begin", name))

        def end(self, name):
            self.events.append(("end", name))

    with phases.observing(Recorder()) as recorder:
        lora_null_init(
            make_model("llama"),
            LoraConfig(r=4, lora_alpha=8),
            knowledge[:200],
            tokenizer,
            num_samples=160,
            holdout_samples=40,
            streaming="on",
        )
    events = recorder.events
    assert all(events[i][0] == "begin" and events[i + 1] == ("end", events[i][1]) for i in range(0, len(events), 2))
    assert {name for _, name in events} == set(phases.ALL)
    lora_null_init(
        make_model("llama"),
        LoraConfig(r=4, lora_alpha=8),
        knowledge[:200],
        tokenizer,
        num_samples=160,
        holdout_samples=0,
        streaming="on",
    )
    assert recorder.events == events


def overlapped_and_sequential(make_model, tokenizer, knowledge, monkeypatch, device="cpu", variant="v2", **settings):
    """The same streaming init twice: solves overlapped on the worker thread, then one after another."""
    import threading

    from lora_null_core.init import solve as solving

    threads = set()
    real_solve = solving.solve_owned_bases

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(solving, "solve_owned_bases", spy)
    results = []
    for overlap in ("on", "off"):
        model = make_model("llama", layers=3).to(device)
        results.append(
            lora_null_init(
                model,
                LoraConfig(r=4, lora_alpha=8),
                knowledge[:200],
                tokenizer,
                num_samples=160,
                holdout_samples=40,
                streaming="on",
                variant=variant,
                overlap=overlap,
                **settings,
            )
        )
    assert any(name.startswith("lora-null-solve") for name in threads)  # the overlapped run used the worker
    return results


@pytest.mark.parametrize("variant", ["v2", "v1"])
def test_solves_overlapped_with_the_next_block_give_the_same_init(
    make_model, tokenizer, knowledge, monkeypatch, variant
):
    """Block i's null bases solved on a worker thread while block i+1 calibrates (`overlap: on`, here on the CPU,
    where auto leaves it off) give exactly the sequential init: factors, residual base, leakage, function error."""
    overlapped, sequential = overlapped_and_sequential(make_model, tokenizer, knowledge, monkeypatch, variant=variant)
    mine, theirs = overlapped.state_dict(), sequential.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[key], theirs[key]) for key in mine)
    assert overlapped.lora_null_report.function_error == sequential.lora_null_report.function_error
    for a, b in zip(overlapped.lora_null_report.layers, sequential.lora_null_report.layers, strict=True):
        assert (a.name, a.leakage, a.leakage_holdout) == (b.name, b.leakage, b.leakage_holdout)


def test_an_error_in_an_overlapped_solve_reaches_the_caller(make_model, tokenizer, knowledge, monkeypatch):
    from lora_null_core.init import solve as solving

    def broken(*_args, **_kwargs):
        raise torch.linalg.LinAlgError("no basis")

    monkeypatch.setattr(solving, "solve_owned_bases", broken)
    with pytest.raises(torch.linalg.LinAlgError, match="no basis"):
        lora_null_init(
            make_model("llama", layers=3),
            LoraConfig(r=4),
            knowledge[:200],
            tokenizer,
            num_samples=160,
            holdout_samples=0,
            streaming="on",
            overlap="on",
        )


def test_when_solves_overlap(make_model, monkeypatch):
    from lora_null_core.init import loop as init_loop
    from lora_null_core.init import phases
    from lora_null_core.init import solve as solving

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    on_cpu = make_model("llama").model.layers
    on_gpu = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    monkeypatch.setattr(init_loop, "blocks_resident", lambda blocks, device: blocks is on_gpu)
    assert init_loop.should_overlap("auto", gpu, on_gpu)
    assert not init_loop.should_overlap("auto", gpu, on_cpu)  # offloaded: the extra peak memory buys little
    assert not init_loop.should_overlap("auto", cpu, on_gpu)  # the solves would take the forward's cores
    assert init_loop.should_overlap("on", cpu, on_cpu)
    assert not init_loop.should_overlap("off", gpu, on_gpu)
    assert not init_loop.should_overlap("on", gpu, None)  # one whole-model step: nothing to overlap
    with phases.observing(object()):  # a profiler times the phases one after another
        assert not init_loop.should_overlap("auto", gpu, on_gpu)
    monkeypatch.setattr(solving, "rank_and_world", lambda: (0, 2))
    assert init_loop.should_overlap("auto", gpu, on_gpu)  # several processes too: the broadcasts stay in order


def test_blocks_resident(make_model):
    from lora_null_core.init.loop import blocks_resident

    blocks = make_model("llama").model.layers
    assert blocks_resident(blocks, torch.device("cpu"))
    assert not blocks_resident(blocks, torch.device("cuda"))  # kept in CPU memory, streamed to the GPU
    assert not blocks_resident(blocks.to("meta"), torch.device("cpu"))  # read from disk block by block


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the solves overlap on a CUDA side stream")
@pytest.mark.parametrize("where", ["gpu", "offload"])
def test_overlapped_solves_on_a_gpu_give_the_same_init(make_model, tokenizer, knowledge, monkeypatch, where):
    """Weights on the GPU (auto would overlap), or kept in CPU memory and prefetched block by block (`on`)."""
    settings = {"device": "cuda"} if where == "gpu" else {"execution_device": "cuda"}
    overlapped, sequential = overlapped_and_sequential(make_model, tokenizer, knowledge, monkeypatch, **settings)
    mine, theirs = overlapped.state_dict(), sequential.state_dict()
    for key in mine:
        assert torch.allclose(mine[key], theirs[key], atol=1e-6), key
    assert overlapped.lora_null_report.function_error < 1e-5


def test_without_overlap_a_block_is_done_before_the_next_one_loads(make_model, tokenizer, knowledge, monkeypatch):
    """With overlap off (auto with offloaded blocks) the loop holds one block at a time, as before the overlap
    existed: block i is released before block i+1 is loaded, so the peak memory does not grow."""
    from lora_null_core.init import block_loaders

    events = []

    class Recording(block_loaders.MoveToDevice):
        def load(self, index, block, device):
            events.append(("load", index))
            super().load(index, block, device)

        def unload(self, index, block):
            events.append(("unload", index))
            super().unload(index, block)

    for overlap, expected in (
        ("off", [(event, i) for i in range(4) for event in ("load", "unload")]),
        # overlapped, block i is finished once block i+2 has calibrated (OVERLAP_DEPTH)
        (
            "on",
            [("load", 0), ("load", 1), ("load", 2), ("unload", 0), ("load", 3), *[("unload", i) for i in (1, 2, 3)]],
        ),
    ):
        events.clear()
        lora_null_init(
            make_model("llama", layers=4),
            LoraConfig(r=4),
            knowledge[:200],
            tokenizer,
            num_samples=160,
            holdout_samples=0,
            streaming="on",
            overlap=overlap,
            block_loader=Recording(),
        )
        assert events == expected, overlap
