"""KVzap training: targets against a naive eager loop, the fits on planted maps, the format, the CLI."""

from __future__ import annotations

import json
import math

import torch
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.kvzap.fit import MLPSettings, fit_mlp, fit_ridge, r2_score
from tests.helpers import tiny_llama
from workers.presses.kvzap import KVzapPress, build_surrogate, load_surrogate, save_surrogate
from workers.studies.kvzap_targets import TargetDocument, extract_targets


def naive_targets(model, ids: torch.Tensor, n_context: int) -> list[torch.Tensor]:
    """KVzip+ from eager attention probabilities, with explicit loops over keys, queries and heads."""
    model.set_attn_implementation("eager")
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // n_heads
    with torch.no_grad():
        out = model(ids[None], output_attentions=True, output_hidden_states=True)
        per_layer = []
        for layer, block in enumerate(model.model.layers):
            h = block.input_layernorm(out.hidden_states[layer][0])  # the attention input
            v = block.self_attn.v_proj(h)
            w_o = block.self_attn.o_proj.weight
            probs = out.attentions[layer][0]
            target = torch.empty(n_kv, n_context)
            for i in range(n_context):
                for g in range(n_kv):
                    best = -math.inf
                    for h_q in range(g * (n_heads // n_kv), (g + 1) * (n_heads // n_kv)):
                        contribution = torch.linalg.vector_norm(
                            w_o[:, h_q * d : (h_q + 1) * d] @ v[i, g * d : (g + 1) * d]
                        )
                        for t in range(n_context, len(ids)):
                            best = max(best, float(probs[h_q, t, i] * contribution / torch.linalg.vector_norm(h[t])))
                    target[g, i] = math.log(best)
            per_layer.append(target)
    return per_layer


def test_targets_equal_a_naive_recomputation_from_eager_attention():
    model = tiny_llama(n_layers=2, seed=3)
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    doc = TargetDocument("d", ids[:12], ids[12:16], ids[16:])
    samples = extract_targets(model, doc, n_samples=7, seed=5)
    expected = naive_targets(model, torch.tensor(ids), n_context=12)
    assert samples.positions.tolist() == sorted(set(samples.positions.tolist())) and len(samples.positions) == 7
    for layer, target in enumerate(expected):
        torch.testing.assert_close(samples.targets[layer], target[:, samples.positions].T, rtol=1e-4, atol=1e-5)
    # inputs are the attention inputs of the sampled context tokens
    with torch.no_grad():
        out = model(torch.tensor(ids)[None], output_hidden_states=True)
        for layer, block in enumerate(model.model.layers):
            h = block.input_layernorm(out.hidden_states[layer][0])
            torch.testing.assert_close(samples.hidden[layer], h[samples.positions])


def test_ridge_recovers_a_planted_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g) * 3 + 1
    w, b = torch.randn(16, 3, generator=g), torch.randn(3, generator=g)
    linear = fit_ridge(x, x @ w + b, alpha=0.0)
    torch.testing.assert_close(linear.weight.T, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.bias, b, rtol=1e-5, atol=1e-5)
    # a penalty shrinks the map toward zero, never past it
    assert fit_ridge(x, x @ w + b, alpha=1e4).weight.norm() < w.norm()


def test_mlp_beats_ridge_on_held_out_non_linear_target():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 2, generator=g)

    def planted(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w) ** 2 + 0.1 * (x @ w)

    x_train, x_test = torch.randn(1500, 8, generator=g), torch.randn(500, 8, generator=g)
    y_train, y_test = planted(x_train), planted(x_test)
    ridge = fit_ridge(x_train, y_train, alpha=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend on a shared machine
    try:
        mlp = fit_mlp(x_train, y_train, MLPSettings(hidden_dim=64, epochs=30, batch_size=128, lr=1e-2))
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        ridge_loss = float(torch.nn.functional.mse_loss(ridge(x_test), y_test))
        mlp_loss = float(torch.nn.functional.mse_loss(mlp(x_test), y_test))
        assert mlp_loss < 0.5 * ridge_loss
        assert r2_score(mlp(x_test), y_test) > 0.7


def test_trained_surrogate_round_trips_through_the_published_format(tmp_path):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 12, generator=g) * 5 + 2, torch.randn(300, 2, generator=g)
    for kind, hidden_dim in (("linear", None), ("mlp", 16)):
        fitted = [
            fit_ridge(x, y, 1.0) if hidden_dim is None else fit_mlp(x, y, MLPSettings(hidden_dim=16, epochs=2))
            for _ in range(3)
        ]
        # the fits are the published architecture: a strict load into it succeeds
        build_surrogate(12, 2, hidden_dim, 3).load_state_dict(torch.nn.ModuleList(fitted).state_dict())
        save_surrogate(torch.nn.ModuleList(fitted), tmp_path / kind, hidden_dim)
        loaded = load_surrogate(str(tmp_path / kind))
        with torch.no_grad():
            for layer in range(3):
                torch.testing.assert_close(loaded[layer](x), fitted[layer](x), rtol=0, atol=0)


def test_kvzap_train_cli_writes_a_surrogate_the_press_evaluates(local_ray, tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jugs".split()
    lines = [json.dumps({"id": f"d{i}", "text": " ".join(words[i:] + words[:i]) * 6}) for i in range(4)]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "surrogate"
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["kvzap", "train", "--model", tiny_model_dir, "--corpus", str(corpus), "--out", str(out),
         "--max-tokens", "48", "--positions", "16", "--epochs", "3", "--hidden-dim", "8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| layer |" in result.output
    for kind in ("linear", "mlp"):
        config = json.loads((out / kind / "config.json").read_text())
        assert config["n_modules"] == 2 and math.isfinite(config["threshold"])
        assert KVzapPress(path=str(out / kind)).default_thresholds == (config["threshold"],)
    assert (out / "report.md").is_file() and (out / "r2_per_layer.png").stat().st_size > 0
    lake = str(tmp_path / "lake")
    submitted = runner.invoke(
        main,
        ["submit", "--model", tiny_model_dir, "--corpus", str(corpus), "--max-docs", "1", "--max-tokens", "64",
         "--chunk-size", "16", "--window", "16", "--methods", f"kvzap:path={out / 'mlp'}", "--lake", lake],
    )  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    assert "kvzap" in submitted.output

    bad = runner.invoke(main, ["kvzap", "train", "--model", tiny_model_dir, "--out", str(out), "--max-docs", "1"])
    assert bad.exit_code == 1 and "Error: --max-docs must be at least 2" in bad.output
