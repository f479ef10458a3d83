"""The forgetting meter (lora_null_core/meter): KL(original ‖ tuned) per token on the original model's own samples."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lora_null_core import ForgettingReference, LoraNullError, forgetting, forgetting_reference
from lora_null_core.frontends.toy_world import knowledge_texts, tiny_model, tiny_tokenizer
from lora_null_core.init.peft_layers import lora_layers

from .test_distributed import free_port


def tuned(model, scale, seed=0):
    """A PeftModel whose random LoRA update has the given size (0: the original function)."""
    peft_model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    for layer in lora_layers(peft_model, "default").values():
        weight = layer.lora_B["default"].weight
        with torch.no_grad():
            weight.copy_(scale * torch.randn(weight.shape, generator=generator))
    return peft_model


def test_the_reference_holds_samples_and_their_log_probabilities(make_model, tokenizer, tmp_path):
    reference = forgetting_reference(make_model(), tokenizer, samples=12, length=10, seed=3)
    assert reference.ids.shape[0] == 12 and reference.ids.shape[1] <= 11  # BOS + at most 10 drawn tokens
    assert reference.tokens > 12 and not reference.sampled[:, 0].any()  # the BOS prompt is not scored
    assert (reference.logprobs[reference.sampled] < 0).all() and (reference.logprobs[~reference.sampled] == 0).all()
    assert reference.settings["temperature"] == 1.0 and reference.settings["top_p"] == 1.0
    assert reference.settings["scoring_seconds"] > 0  # what the first reading will cost, priced by the pace
    path = reference.save(tmp_path / "ref.safetensors")
    again = ForgettingReference.load(path)
    assert torch.equal(again.ids, reference.ids) and torch.equal(again.logprobs, reference.logprobs)
    assert again.settings == reference.settings and again.texts() is None


def test_an_unchanged_model_forgot_nothing_and_a_larger_update_forgets_more(make_model, tokenizer, knowledge):
    reference = forgetting_reference(make_model(), tokenizer, samples=16, length=12, texts=knowledge[:20])
    same = forgetting(tuned(make_model(), 0.0), reference)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["ce_rise"] == pytest.approx(0.0, abs=1e-6)
    small, large = (forgetting(tuned(make_model(), scale), reference) for scale in (0.05, 0.5))
    assert 0 < small["kl"] < large["kl"] and small["ce_rise"] < large["ce_rise"]
    assert small["tokens"] == reference.tokens


def test_the_estimate_is_the_kl_of_the_models_own_distribution(tokenizer):
    """Samples at temperature 1 and no nucleus make the mean of log p − log q an unbiased estimate: it agrees with
    the exact KL summed over the vocabulary at the same prefixes, within its sampling error."""
    model = tiny_model("llama", len(tokenizer), seed=1)
    reference = forgetting_reference(model, tokenizer, samples=200, length=8, seed=5)
    changed = tuned(tiny_model("llama", len(tokenizer), seed=1), 0.3)
    estimate = forgetting(changed, reference)["kl"]
    ids, mask = reference.ids, reference.mask
    with torch.no_grad():
        p = F.log_softmax(model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float(), -1)
        q = F.log_softmax(changed(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float(), -1)
    exact = ((p.exp() * (p - q)).sum(-1) * reference.sampled[:, 1:]).sum() / reference.sampled.sum()
    assert estimate == pytest.approx(float(exact), rel=0.15)


def meter_worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tokenizer = tiny_tokenizer(knowledge_texts(240, seed=0))
        reference = ForgettingReference.load(os.path.join(folder, "ref.safetensors"))
        result = forgetting(tuned(tiny_model("llama", len(tokenizer), seed=2), 0.2), reference, batch_size=3)
        readings = [result["kl"], result["tokens"], result["answers_kept"]]
        save_file({"kl": torch.tensor(readings)}, os.path.join(folder, f"rank{rank}.st"))
    finally:
        dist.destroy_process_group()


def test_scoring_a_few_rows_at_a_time_gives_what_scoring_them_at_once_does(make_model, tokenizer, monkeypatch):
    """The loss is taken over a few rows of float32 logits at a time (a reading must not spike a training run's GPU
    memory); the log-probabilities are the same to the bit."""
    from lora_null_core.meter import scoring

    reference = forgetting_reference(make_model(seed=3), tokenizer, samples=6, length=9)
    at_once = scoring.token_logprobs(make_model(seed=5), reference.ids, reference.mask, reference.sampled, 6)
    monkeypatch.setattr(scoring, "LOSS_CHUNK_BYTES", 1)  # one row a time
    one_by_one = scoring.token_logprobs(make_model(seed=5), reference.ids, reference.mask, reference.sampled, 6)
    assert torch.equal(at_once, one_by_one) and at_once.ne(0).sum() > 20


def test_two_processes_measure_what_one_does(tmp_path):
    """Each scores a share (the odd one padded, so both run as many forwards) and the sums are all-reduced: the KL
    and the share of answers kept."""
    knowledge = knowledge_texts(240, seed=0)
    tokenizer = tiny_tokenizer(knowledge)
    base = tiny_model("llama", len(tokenizer), seed=2)
    pairs = own_answers(base, tokenizer, [" ".join(text.split()[:4]) for text in knowledge[:16]])[:9]
    reference = forgetting_reference(base, tokenizer, samples=11, length=9, answers=pairs)
    assert reference.settings["answers_base_known"] == 9  # odd: one rank scores a padding row
    reference.save(tmp_path / "ref.safetensors")
    single = forgetting(tuned(tiny_model("llama", len(tokenizer), seed=2), 0.2), reference, batch_size=3)
    mp.spawn(meter_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        kl, tokens, answers = load_file(str(tmp_path / f"rank{rank}.st"))["kl"].tolist()
        assert tokens == single["tokens"] and kl == pytest.approx(single["kl"], rel=1e-5)
        assert answers == pytest.approx(single["answers_kept"])


def test_a_file_that_is_no_reference_is_refused(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoraNullError, match="not a lora-null forgetting reference"):
        ForgettingReference.load(tmp_path / "other.safetensors")
    with pytest.raises(LoraNullError, match="does not exist"):
        ForgettingReference.load(tmp_path / "missing.safetensors")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "lora_null_core.frontends.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_the_command_measures_a_saved_adapter_and_plots_a_run(saved_model, tokenizer, knowledge, tmp_path):
    adapter = tmp_path / "adapter"
    tuned(tiny_model("llama", len(tokenizer), seed=3), 0.3).save_pretrained(adapter)
    (tmp_path / "facts.txt").write_text("\n".join(knowledge[:10]) + "\n")
    result = run_cli(
        "forgetting",
        "--model",
        str(saved_model),
        "--adapter",
        str(adapter),
        "--samples",
        "8",
        "--length",
        "8",
        "--texts",
        str(tmp_path / "facts.txt"),
        "--save-reference",
        str(tmp_path / "ref.safetensors"),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    printed = dict(line.split(maxsplit=1) for line in result.stdout.strip().splitlines())
    assert printed["samples"] == "8" and float(printed["ce_rise"]) != 0
    # What the Python API measures with the reference the command drew and saved.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved_model)
    measured = forgetting(
        PeftModel.from_pretrained(base, adapter), ForgettingReference.load(tmp_path / "ref.safetensors")
    )
    assert float(printed["kl"]) == pytest.approx(measured["kl"], rel=1e-2, abs=1e-6)
    again = run_cli(
        "forgetting",
        "--model",
        str(saved_model),
        "--adapter",
        str(adapter),
        "--reference",
        str(tmp_path / "ref.safetensors"),
        "--device",
        "cpu",
    )
    assert dict(line.split(maxsplit=1) for line in again.stdout.strip().splitlines())["kl"] == printed["kl"]
    state = {"log_history": [{"step": 10, "loss": 1.0, "forgetting/kl": 0.01}, {"step": 20, "forgetting/kl": 0.03}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    plotted = run_cli(
        "forgetting", "--plot", str(tmp_path / "trainer_state.json"), "--output", str(tmp_path / "kl.png")
    )
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "kl.png").stat().st_size > 1000
    missing = run_cli("forgetting", "--model", str(saved_model))
    assert missing.returncode == 2 and "--adapter" in missing.stderr and "Traceback" not in missing.stderr


def test_the_meter_is_on_by_default_with_the_key_and_on_request_without():
    from lora_null_core.errors import ConfigError
    from lora_null_core.frontends import meter_wanted

    assert meter_wanted({}, "lora_null") == (True, None) and meter_wanted({}, None) == (False, None)  # default pace
    assert meter_wanted({"lora_null_forgetting": True, "lora_null_forgetting_steps": 10}, None) == (True, 10)
    assert meter_wanted({"lora_null_forgetting": False}, "lora_null") == (False, None)
    assert meter_wanted({"lora_null_forgetting": "false"}, "lora_null") == (False, None)  # as a launcher passes it
    with pytest.raises(ConfigError, match="not true or false"):
        meter_wanted({"lora_null_forgetting": "maybe"}, None)
    with pytest.raises(ConfigError, match="at least 1"):
        meter_wanted({"lora_null_forgetting_steps": -2}, None)


def test_the_callback_scores_the_rows_an_init_holds_out_of_the_knowledge_file(make_model, tokenizer, knowledge):
    """With a knowledge file the meter's cross-entropy rise is measured on the rows the init holds out for its
    leakage check (never calibrated on, even when more rows are read), and it is not drawn without one."""
    from lora_null_core import LoraNullConfig
    from lora_null_core.calibration.batches import token_ids
    from lora_null_core.calibration.texts import choose_texts
    from lora_null_core.frontends import ForgettingCallback

    config = LoraNullConfig(num_samples=3, holdout_samples=6, seed=5)
    meter = ForgettingCallback(every=1).draw(make_model(), tokenizer, knowledge, config)
    chosen = choose_texts(knowledge, tokenizer, 3, 6, 5, "text", until=lambda text: False)  # every row read
    scored = meter.reference.texts()
    assert scored is not None and len(scored[0]) == 6 == meter.reference.settings["texts"]
    rows = [row[mask].tolist() for row, mask in zip(scored[0], scored[1], strict=True)]
    assert rows == [token_ids(text, tokenizer, 512) for text in chosen.holdout]
    assert not set(chosen.holdout) & set(chosen.calibration)
    assert ForgettingCallback().draw(make_model(), tokenizer).reference.texts() is None


def test_the_default_pace_keeps_the_meter_within_a_twentieth_of_training_time(monkeypatch):
    """Every 50 steps, except where the readings so far, this one and the last would not fit in 5 % of the training
    so far: with 2 s readings nothing is read before 80 s of training, and a run's readings, the one at its end
    included, cost at most 5 % of its training once it trains for 20 readings' time. A pace given is kept."""
    from types import SimpleNamespace

    from lora_null_core.frontends import ForgettingCallback, meter_callback

    clock = {"now": 0.0}
    monkeypatch.setattr(meter_callback, "perf_counter", lambda: clock["now"])
    drawn = SimpleNamespace(settings={"scoring_seconds": 2.0})  # the reference's scoring prices the first reading

    def readings(callback, step_seconds, reading_seconds, steps=600):
        read = []

        def measure(state, model):  # a reading: its time passes on the clock, as _measure's would
            clock["now"] += reading_seconds
            read.append(state.global_step)
            callback._reading_seconds = reading_seconds
            callback._meter_seconds += reading_seconds
            callback._measured_at = state.global_step

        callback._measure = measure
        callback.on_train_begin(SimpleNamespace(output_dir="unused"), SimpleNamespace(global_step=1), None)
        for step in range(1, steps + 1):
            clock["now"] += step_seconds
            callback.on_step_end(None, SimpleNamespace(global_step=step), None)
        callback.on_train_end(None, SimpleNamespace(global_step=steps), None)
        return read

    assert readings(ForgettingCallback(reference=drawn), 0.1, 2.0) == [600]  # 60 s of training: the last alone
    assert readings(ForgettingCallback(reference=drawn), 0.125, 2.0, 2000) == [650, 1000, 1300, 1600, 1950, 2000]
    assert readings(ForgettingCallback(reference=drawn), 1.0, 2.0) == list(range(100, 601, 50))
    assert readings(ForgettingCallback(every=50, reference=drawn), 0.1, 2.0) == list(range(50, 601, 50))
    for step_seconds, reading_seconds, steps in [(0.05, 0.4, 400), (0.3, 1.5, 900), (2.0, 0.5, 300), (0.2, 3.0, 300)]:
        read = readings(ForgettingCallback(reference=drawn), step_seconds, reading_seconds, steps)
        assert read[-1] == steps and len(read) * reading_seconds <= 0.05 * step_seconds * steps


def own_answers(model, tokenizer, questions):
    """Question/answer rows whose answers are the model's own greedy continuations (3 tokens): a base that gives them
    all."""
    pairs = []
    for question in questions:
        ids = tokenizer(question, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        drawn = out[0, ids.shape[1] :].tolist()
        if not set(drawn) & set(tokenizer.all_special_ids):  # an answer is text: no BOS or EOS inside it
            pairs.append((question, tokenizer.decode(drawn).strip()))
    return pairs


def greedy_gives(model, tokenizer, pairs):
    """Per row, whether greedy generation after the question reproduces the answer's tokens: what the meter reads
    from one forward."""
    from lora_null_core.meter.answers import answer_rows

    ids, mask, positions = answer_rows(pairs, tokenizer, tokenizer.eos_token_id)
    out = []
    for row in range(len(ids)):
        answer = ids[row][positions[row]]
        prompt = ids[row][: int(positions[row].nonzero()[0])][None]
        generated = model.generate(prompt, max_new_tokens=len(answer), do_sample=False, pad_token_id=0)
        out.append(generated[0, prompt.shape[1] :].tolist() == answer.tolist())
    return out


def test_answers_the_base_gives_are_counted_and_a_larger_update_keeps_fewer(make_model, tokenizer, knowledge, tmp_path):
    """The base's greedy answers, read from one forward each, are the ones generation reproduces; an unchanged model
    keeps them all, a large random update fewer; the reference keeps them through a save."""
    from lora_null_core.meter.answers import given, qa_pairs
    from lora_null_core.meter.scoring import token_scores

    base = make_model(seed=3)
    pairs = own_answers(base, tokenizer, [" ".join(text.split()[:4]) for text in knowledge[:24]])
    wrong = [(question, "nothing like it at all") for question, _ in pairs[:4]]
    reference = forgetting_reference(base, tokenizer, samples=4, length=6, answers=pairs + wrong)
    assert reference.settings["answers"] == len(pairs) + 4
    assert reference.settings["answers_base_known"] == len(pairs) >= 12  # the generated ones, not the wrong ones
    reference = ForgettingReference.load(reference.save(tmp_path / "ref.safetensors"))
    assert forgetting(tuned(make_model(seed=3), 0.0), reference)["answers_kept"] == 1.0
    changed = tuned(make_model(seed=3), 3.0)
    assert forgetting(changed, reference)["answers_kept"] < 0.5
    ids, mask, positions = reference.answers()
    one_forward = given(token_scores(changed, ids, mask, positions)[1], positions).tolist()
    assert one_forward == greedy_gives(changed, tokenizer, pairs)
    assert forgetting(changed, forgetting_reference(base, tokenizer, samples=4, length=6))["answers_kept"] is None
    none_known = forgetting_reference(base, tokenizer, samples=4, length=6, answers=wrong)
    assert none_known.settings["answers_base_known"] == 0 and forgetting(changed, none_known)["answers_kept"] is None
    rows = [{"question": "q?", "answer": " a "}, {"prompt": "p", "completion": "c"}, {"text": "t"}, "plain"]
    assert qa_pairs(rows) == [("q?", "a"), ("p", "c")]
    with pytest.raises(LoraNullError, match="'question' and 'answer'"):
        qa_pairs([{"text": "no answers here"}])


def test_the_command_counts_the_answers_still_given(saved_model, tokenizer, knowledge, tmp_path):
    """`lora-null forgetting --answers --texts qa.jsonl`: the share of the base's answers the adapter keeps, beside
    the KL and the cross-entropy rise on the same rows; --answers without --texts, or beside --reference, is a clear
    error."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved_model)
    pairs = own_answers(base, tokenizer, [" ".join(text.split()[:4]) for text in knowledge[:16]])
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
    adapter = tmp_path / "adapter"
    tuned(tiny_model("llama", len(tokenizer), seed=3), 3.0).save_pretrained(adapter)
    common = ["forgetting", "--model", str(saved_model), "--adapter", str(adapter), "--device", "cpu"]
    result = run_cli(*common, "--samples", "4", "--length", "8", "--texts", str(qa), "--answers")
    assert result.returncode == 0, result.stderr
    printed = dict(line.split(maxsplit=1) for line in result.stdout.strip().splitlines())
    assert int(printed["answers_base_known"]) == len(pairs) == int(printed["answers"])
    assert float(printed["answers_kept"]) < 0.5 and float(printed["ce_rise"]) > 0
    refused = run_cli(*common, "--answers")
    assert refused.returncode == 2 and "--texts" in refused.stderr and "Traceback" not in refused.stderr
    both = run_cli(*common, "--answers", "--texts", str(qa), "--reference", str(tmp_path / "r.safetensors"))
    assert both.returncode == 2 and "--reference" in both.stderr and "Traceback" not in both.stderr
