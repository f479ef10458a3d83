"""The task-aware null space: A where knowledge inputs are weak relative to the fine-tuning inputs
(null_space.task_aware_basis; lora_null_init(..., task_data=...))."""

import pytest
import torch
from peft import LoraConfig

from lora_null_core import LoraNullConfig, collect_covariances, lora_null_init
from lora_null_core.calibration.batches import tokenize_batches
from lora_null_core.errors import ConfigError
from lora_null_core.init.peft_layers import lora_layers
from lora_null_core.null_space import null_basis, task_aware_basis

SMALL = dict(num_samples=160, holdout_samples=0, task_samples=64)


def test_among_the_least_used_directions_it_picks_the_ones_the_task_uses():
    knowledge = torch.diag(torch.tensor([1e-4] * 4 + [2e-4] * 4 + [1.0] * 8, dtype=torch.float64))
    task = torch.diag(torch.tensor([0.0] * 4 + [5.0] * 4 + [1.0] * 8, dtype=torch.float64))
    plain, aware = null_basis(knowledge, 4), task_aware_basis(knowledge, task, 4, 0.01)
    assert torch.allclose(aware.T @ aware, torch.eye(4, dtype=torch.float64), atol=1e-12)
    in_dims = lambda basis, dims: float((basis[dims] ** 2).sum()) / 4  # noqa: E731
    assert in_dims(plain, slice(0, 4)) > 0.999  # the plain null basis: the knowledge's smallest directions
    assert in_dims(aware, slice(4, 8)) > 0.99  # task-aware: almost as unused by knowledge, and used by the task
    far = task_aware_basis(knowledge, task, 4, 1e8)  # a huge mix is the plain null space again
    assert torch.allclose(far @ far.T, plain @ plain.T, atol=1e-6)
    with pytest.raises(ConfigError, match="task_mix=0 must be positive"):
        LoraNullConfig(task_mix=0)


def test_a_task_covariance_left_slightly_indefinite_by_rounding_is_solved_not_refused():
    # Qwen2.5's task inputs: a massive channel holds most of the trace, and float32 sums leave eigenvalues of about
    # -1e-3 of it in the directions no token uses, beyond what task_mix 0.01 shifts (a Cholesky of C_t + mix·I
    # failed there on a GPU). Knowledge is weak in dims 8-15, of which the task uses 8-11.
    generator = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=generator, dtype=torch.float64)).Q
    knowledge = rotation @ torch.diag(torch.tensor([1.0] * 8 + [1e-4] * 8, dtype=torch.float64)) @ rotation.T
    rounding = [-0.05] * 4  # in the unit-trace scale, negative beyond the mix
    task_values = torch.tensor([15.0] + [0.1] * 7 + [0.5] * 4 + rounding, dtype=torch.float64)
    task = rotation @ torch.diag(task_values) @ rotation.T
    with pytest.raises(torch.linalg.LinAlgError):  # what the solve met before
        torch.linalg.cholesky(task * 16 / torch.trace(task) + 0.01 * torch.eye(16, dtype=torch.float64))
    basis = task_aware_basis(knowledge, task, 4, 0.01)
    assert torch.allclose(basis.T @ basis, torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert float((rotation.T @ basis)[8:12].pow(2).sum()) / 4 > 0.99  # knowledge's weakest, where the task is


def summed_covariance(d, scales, seed, tokens=3000):
    """Σ xᵀx summed in float32, as calibration sums it, over activations with the given spread of scales."""
    g = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    x = ((torch.randn(tokens, d, generator=g, dtype=torch.float64) * scales) @ rotation.T).float()
    return sum((chunk.T @ chunk for chunk in x.split(64)), torch.zeros(d, d))


def test_the_subspace_solver_reaches_the_exact_task_aware_quotient():
    # The GPU's default (subspace) solves the whitened matrix in C_k's float32: its generalized Rayleigh quotient
    # Σλ, trace((Uᵀ(C_t + mix·I)U)⁻¹ UᵀC_kU) in the unit-trace scale, must come near the exact basis's.
    d = 512
    knowledge = summed_covariance(d, torch.logspace(0, -3, d, dtype=torch.float64), seed=0)
    task = summed_covariance(d, torch.logspace(-2, 0, d, dtype=torch.float64), seed=1)
    k, t = (m.double() * d / torch.trace(m.double()) for m in (knowledge, task))
    t = t + 0.01 * torch.eye(d, dtype=torch.float64)

    def quotient(basis):
        return float(torch.trace(torch.linalg.solve(basis.T @ t @ basis, basis.T @ k @ basis)))

    exact = task_aware_basis(knowledge, task, 16, 0.01, "eigh64")
    fast = task_aware_basis(knowledge, task, 16, 0.01, "subspace")
    assert torch.allclose(fast.T @ fast, torch.eye(16, dtype=torch.float64), atol=1e-8)
    assert quotient(exact) <= quotient(fast) <= 1.1 * quotient(exact)


def energies(model, tokenizer, texts, layers):
    """Per layer: energy per direction of A's rows in a covariance, relative to an average direction."""
    own = dict(model.named_modules())
    base = {name.removeprefix("base_model.model."): own[name.removeprefix("base_model.model.")] for name in layers}
    covariances = collect_covariances(model, base, tokenize_batches(texts, tokenizer, 64, 32), torch.float64)
    result = {}
    for name, layer in layers.items():
        rows = torch.linalg.qr(layer.lora_A["default"].weight.detach().double().T).Q
        matrix = covariances.of(name.removeprefix("base_model.model."))
        result[name] = float(
            torch.trace(rows.T @ matrix @ rows) / torch.trace(matrix) * matrix.shape[0] / rows.shape[1]
        )
    return result


@pytest.mark.parametrize("streaming", ["on", "off"])
def test_with_task_data_a_holds_more_task_and_stays_out_of_knowledge(make_model, tokenizer, knowledge, task, streaming):
    settings = dict(SMALL, streaming=streaming, init="basis")
    plain = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, **settings)
    aware = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, task_data=task, **settings)
    assert aware.lora_null_report.function_error < 1e-6
    recorded = aware.lora_null_report.calibration["task_data"]
    assert recorded["num_samples"] == 64 and recorded["task_mix"] == 0.01
    assert plain.lora_null_report.calibration["task_data"] is None
    reference = make_model()
    layers = {kind: lora_layers(model, "default") for kind, model in (("plain", plain), ("aware", aware))}
    on_task = {kind: energies(reference, tokenizer, task, found) for kind, found in layers.items()}
    on_knowledge = {kind: energies(reference, tokenizer, knowledge[:160], found) for kind, found in layers.items()}
    mean = lambda values: sum(values.values()) / len(values)  # noqa: E731
    assert mean(on_task["aware"]) > 1.5 * mean(on_task["plain"]), (mean(on_task["aware"]), mean(on_task["plain"]))
    assert mean(on_knowledge["aware"]) < 0.5, on_knowledge["aware"]  # still far below an average direction


def test_streaming_and_the_whole_model_pass_agree(make_model, tokenizer, knowledge, task):
    results = [
        lora_null_init(
            make_model(),
            LoraConfig(r=4),
            knowledge,
            tokenizer,
            task_data=task,
            streaming=mode,
            accumulate_dtype="float64",
            **SMALL,
        )
        for mode in ("on", "off")
    ]
    mine, theirs = (r.state_dict() for r in results)
    for key in (k for k in mine if "lora_" in k):
        assert torch.allclose(mine[key].abs(), theirs[key].abs(), atol=1e-5), key


def test_cli_task_data_is_recorded(saved_model, knowledge, task, tmp_path):
    import json

    from lora_null_core.frontends.cli import main
    from lora_null_core.frontends.toy_world import write_jsonl

    write_jsonl(tmp_path / "knowledge.jsonl", knowledge)
    write_jsonl(tmp_path / "task.jsonl", task)
    assert (
        main(
            [
                "init",
                "--model",
                str(saved_model),
                "--calibration",
                str(tmp_path / "knowledge.jsonl"),
                "--task-data",
                str(tmp_path / "task.jsonl"),
                "--task-mix",
                "0.1",
                "--rank",
                "4",
                "--num-samples",
                "160",
                "--output",
                str(tmp_path / "init"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    recorded = json.loads((tmp_path / "init" / "lora_null.json").read_text())["calibration"]["task_data"]
    assert recorded == {"source": str(tmp_path / "task.jsonl"), "num_samples": 64, "task_mix": 0.1}


def test_inspect_shows_where_an_inits_a_points_on_knowledge_and_on_the_task(
    saved_model, knowledge, task, tmp_path, capsys
):
    """`inspect --task-data`: per layer, A's energy on the task inputs beside its energy on knowledge; a task-aware
    A has far more on the task, a plain one less; --task-data without an init is a clear error."""
    import json

    from lora_null_core.frontends.cli import main
    from lora_null_core.frontends.toy_world import write_jsonl

    write_jsonl(tmp_path / "knowledge.jsonl", knowledge)
    write_jsonl(tmp_path / "task.jsonl", task)
    common = ["--model", str(saved_model), "--calibration", str(tmp_path / "knowledge.jsonl"), "--device", "cpu"]
    means = {}
    for name, extra in (("plain", []), ("aware", ["--task-data", str(tmp_path / "task.jsonl")])):
        assert main(["init", *common, *extra, "--rank", "4", "--output", str(tmp_path / name)]) == 0
        assert (
            main(
                [
                    "inspect",
                    *common,
                    "--task-data",
                    str(tmp_path / "task.jsonl"),
                    "--init-dir",
                    str(tmp_path / name),
                    "--output",
                    str(tmp_path / f"report-{name}"),
                ]
            )
            == 0
        )
        data = json.loads((tmp_path / f"report-{name}" / "report.json").read_text())
        assert data["task_data"]["source"] == str(tmp_path / "task.jsonl")
        layers = data["layers"]
        assert all(layer["energy_task"] == pytest.approx(layer["task_leakage"] ** 2) for layer in layers)
        means[name] = {k: sum(layer[k] for layer in layers) / len(layers) for k in ("energy_knowledge", "energy_task")}
        html = (tmp_path / f"report-{name}" / "report.html").read_text()
        assert "<th>on task data</th>" in html and "Task data: " in html
    assert means["aware"]["energy_task"] > 1.5 * means["plain"]["energy_task"], means
    assert means["aware"]["energy_task"] > 5 * means["aware"]["energy_knowledge"], means
    assert (
        main(["inspect", *common, "--task-data", str(tmp_path / "task.jsonl"), "--output", str(tmp_path / "no-init")])
        == 2
    )
    assert "give --init-dir too" in capsys.readouterr().err
    assert not (tmp_path / "no-init").exists()


def test_with_task_data_a_keeps_the_papers_factors_unless_told(make_model, tokenizer, knowledge, task):
    """The task-aware A already carries the task: at the frozen-A default of 2 it overshoots at LoRA's rate, so with
    task data and no a_scale the applied scale is 1; a given a_scale is kept, and without task data it is 2."""
    aware = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, task_data=task, **SMALL)
    told = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, task_data=task, a_scale=3, **SMALL)
    plain = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, **SMALL)
    assert [m.lora_null_report.config["a_scale"] for m in (aware, told, plain)] == [1.0, 3.0, 2.0]
    basis = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, task_data=task, init="basis", **SMALL)
    norms = [
        float(layer.lora_A["default"].weight.norm(dim=1).mean()) for layer in lora_layers(basis, "default").values()
    ]
    assert all(abs(n - 1.0) < 1e-5 for n in norms)  # the orthonormal basis, not scaled
