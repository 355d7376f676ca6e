"""`mmbridge bench` (structure of its JSON and markdown at tiny size) and the decode options with their
quality check (`generation.decode_options`) on tiny models."""

import copy
import json

import numpy as np
import pytest
import torch

from mmbridge.cli import main
from mmbridge.generation import MMBridgePipeline
from mmbridge.generation.decode_options import (
    Int8WeightOnlyLinear,
    apply_decode_options,
    greedy_agreement,
    llm_bytes_per_token,
    prompt_batches,
    quantize_int8_,
)
from mmbridge.testing import build_tiny


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(seed=0, init_std=0.5)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    batches = prompt_batches(processor, images, ["What is this?", "Describe the image."], batch_size=4)
    return model, processor, batches


def test_int8_linear_matches_float_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    quantized = Int8WeightOnlyLinear.from_linear(linear)
    assert quantized.weight.dtype == torch.int8 and quantized.weight.shape == (48, 64)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected, got = linear(x), quantized(x)
    assert got.dtype == x.dtype and got.shape == expected.shape
    # int8 weights (per-row scales) and bf16 activations: ~1 % of the output's scale
    assert (got - expected).abs().max() < 0.03 * expected.abs().max()


def test_group_wise_int8_is_closer_to_the_float_linear_on_every_path():
    """int8-g32: one scale per 32 columns. Its one-row path is a compiled fp32 GEMV, its many-row path a
    blocked dequantize + bf16 GEMM: the same product up to bf16 rounding, and closer to fp32 than per-row
    scales."""
    from mmbridge.modeling.quantize import DEQUANT_BLOCK, GEMV_ROWS

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, DEQUANT_BLOCK + 40)  # two dequantize blocks, the last one short
    torch.nn.init.normal_(linear.weight, std=0.02)  # bell-shaped, as an LLM's: a row's extremes are rare
    grouped = Int8WeightOnlyLinear.from_linear(linear, group_size=32)
    per_row = Int8WeightOnlyLinear.from_linear(linear)
    assert grouped.scale.shape == (DEQUANT_BLOCK + 40, 8) and grouped.weight.dtype == torch.int8
    x = torch.randn(GEMV_ROWS + 3, 256)
    with torch.no_grad():
        expected = linear(x)
        together = grouped(x)  # more than GEMV_ROWS rows: the blocked path
        one_by_one = torch.cat([grouped(row[None]) for row in x])  # the compiled GEMV
        torch.testing.assert_close(together, one_by_one, rtol=0.02, atol=0.01)
        few = grouped(x[:GEMV_ROWS])  # a few rows at once: one GEMV kernel, each weight row read once
        torch.testing.assert_close(few, one_by_one[:GEMV_ROWS], rtol=1e-5, atol=1e-5)
        for got in (together, one_by_one):
            assert (got - expected).abs().mean() < 0.85 * (per_row(x) - expected).abs().mean()
    assert "per 32 columns" in repr(grouped)
    # a width the groups do not divide keeps one scale per row
    assert Int8WeightOnlyLinear.from_linear(torch.nn.Linear(40, 8), group_size=32).group_size is None


def test_group_wise_int8_keeps_decoding_when_compiling_fails(monkeypatch, caplog):
    """No C++ compiler (or an inductor failure): the group-wise GEMV runs eagerly, says so once, and
    gives the same product."""
    from mmbridge.modeling import quantize

    def broken(*args):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(quantize.group_gemv, "compiled", broken)
    torch.manual_seed(0)
    layer = Int8WeightOnlyLinear.from_linear(torch.nn.Linear(64, 16), group_size=32)
    x = torch.randn(1, 64)
    with caplog.at_level("WARNING", logger=quantize.__name__), torch.no_grad():
        got, again = layer(x), layer(x)
    torch.testing.assert_close(got, quantize._group_gemv(x, layer.weight, layer.scale) + layer.bias)
    torch.testing.assert_close(again, got)
    assert len([r for r in caplog.records if "torch.compile" in r.getMessage()]) == 1  # said once
    assert "no C++ compiler found" in caplog.text and quantize.group_gemv.compiled is quantize._group_gemv


def test_group_wise_int8_compiles_every_shape_a_large_llm_has():
    """A 1 B LLM has ~20 (weight shape, rows) pairs, more than dynamo's default recompile limit (8), after
    which dynamo would run the GEMV eagerly and 30x slower without an error: every shape gets its kernel."""
    import torch._dynamo

    from mmbridge.modeling import quantize

    torch.manual_seed(0)
    before = torch._dynamo.utils.counters["frames"]["ok"]
    layers = [Int8WeightOnlyLinear.from_linear(torch.nn.Linear(64, 8 * (i + 1)), group_size=32) for i in range(5)]
    with torch.no_grad():
        for layer in layers:
            for rows in (1, 2):
                x = torch.randn(rows, 64)
                torch.testing.assert_close(layer(x), quantize._group_gemv(x, layer.weight, layer.scale) + layer.bias)
    assert quantize.group_gemv.compiled is not quantize._group_gemv
    assert torch._dynamo.utils.counters["frames"]["ok"] - before >= 10  # 10 compiled, none left to eager


def test_quantize_replaces_plain_linears_only():
    from peft import LoraConfig, inject_adapter_in_model

    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    inject_adapter_in_model(LoraConfig(target_modules=["2"], r=2), module)
    assert quantize_int8_(module) == 1  # the LoRA-wrapped layer keeps its float weight
    assert isinstance(module[0], Int8WeightOnlyLinear)
    assert module[2].base_layer.weight.dtype == torch.float32


def test_greedy_agreement_of_a_model_with_itself_is_perfect(tiny):
    model, _, batches = tiny
    result = greedy_agreement(model, model, batches, max_new_tokens=6)
    assert 0 < result.pop("tokens") <= 6 * 6  # positions after a row's EOS do not count
    assert result == {"agreement": 1.0, "sequence_match": 1.0, "nll_delta": 0.0}


def test_greedy_agreement_sees_a_changed_model(tiny):
    model, _, batches = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        for param in other.llm.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    result = greedy_agreement(model, other, batches, max_new_tokens=6)
    assert result["agreement"] < 0.9 and result["nll_delta"] > 0


@pytest.mark.parametrize("options", [{"quantize": "int8"}, {"quantize": "int8-g32"}, {"kv_cache": "static"}])
def test_decode_options_keep_greedy_answers_close(tiny, options):
    model, _, batches = tiny
    candidate = apply_decode_options(copy.deepcopy(model), **options)
    result = greedy_agreement(model, candidate, batches, max_new_tokens=6)
    if "kv_cache" in options:  # same weights, same arithmetic: the same tokens
        assert candidate.llm.model.generation_config.cache_implementation == "static"
        assert result["agreement"] == result["sequence_match"] == 1.0
    else:  # the tiny model's std-0.5 weights are far from a trained LM's; still most steps agree
        assert result["agreement"] >= 0.75
        assert llm_bytes_per_token(candidate.llm.model) < 0.5 * llm_bytes_per_token(model.llm.model)


def test_decode_options_reject_unknown_values(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="quantize"):
        apply_decode_options(copy.deepcopy(model), quantize="int3")
    with pytest.raises(ValueError, match="kv_cache"):
        apply_decode_options(copy.deepcopy(model), kv_cache="paged")


def test_pipeline_options_generate_and_chat(tiny_model_dir, images):
    pipeline = MMBridgePipeline.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, quantize="int8",
                                                kv_cache="static")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert pipeline.generate(conversation, images=images[:1], max_new_tokens=4)[0].completion_tokens >= 1
    session = pipeline.chat(max_new_tokens=3)  # sessions keep their own growing cache (KV reuse)
    session.ask("What is this?", images=images[:1])
    assert session.ask("And then?").completion_tokens >= 1


def test_bench_tiny_writes_json_and_markdown(tmp_path, tiny_model_dir):
    out, work = tmp_path / "out", tmp_path / "work"
    code = main(["bench", "--llm-size", "tiny", "--repeats", "1", "--new-tokens", "3", "--options", "int8",
                 "--skip", "memory", "--train-steps", "1", "--quality-model", str(tiny_model_dir), "--profile",
                 "--quality-images", "2", "--quality-tokens", "4", "--out", str(out), "--work", str(work)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert {"machine", "model", "decode", "quality", "chat", "train", "shipped", "profile"} <= set(result)
    assert result["profile"]["mmbridge fp32"][0]["self_cpu_pct"] > 0
    shipped = {row["option"]: row for row in result["shipped"]["rows"]}
    assert set(shipped) == {"fp32", "int8", "merged", "bf16+merged"}
    assert {"decode_tok_s_b1", "vs_fp32", "agreement", "sequence_match", "nll_delta"} <= set(shipped["int8"])
    assert result["machine"]["bandwidth"]["matvec_gb_s"] > 0 and result["machine"]["bandwidth"]["copy_gb_s"] > 0
    rows = {(r["impl"], r["option"]): r for r in result["decode"]}
    assert set(rows) == {("hf", "fp32"), ("hf", "bf16"), ("mmbridge", "fp32"), ("mmbridge", "int8")}
    for row in rows.values():
        assert {"ttft_ms", "decode_tok_s_b1", "decode_tok_s_b8", "decode_gb_s", "bandwidth_pct",
                "llm_bytes_per_token"} <= set(row)
        assert row["ttft_ms"] > 0
    assert set(rows[("mmbridge", "int8")]["vs_hf_fp32"]) == {"ttft", "decode_b1", "decode_b8"}
    assert rows[("mmbridge", "int8")]["llm_bytes_per_token"] < rows[("mmbridge", "fp32")]["llm_bytes_per_token"]
    assert set(result["quality"]) == {"int8"}
    assert 0 <= result["quality"]["int8"]["agreement"] <= 1
    assert 0 < result["quality"]["int8"]["tokens"] <= 2 * 2 * 4  # 2 images x 2 questions x 4 tokens
    for turn in result["chat"].values():
        assert {"mmbridge_reuse", "mmbridge_reencode", "hf_reencode", "reuse_speedup", "vs_hf"} <= set(turn)
    assert result["train"]["mmbridge_samples_s"] > 0 and result["train"]["hf_samples_s"] > 0
    text = (out / "bench.md").read_text()
    assert "| impl | option | TTFT ms | decode tok/s b1" in text
    assert f"over {result['quality']['int8']['tokens']} teacher-forced answer tokens" in text
    assert text.count("| mmbridge | ") == 2 and text.count("| hf | ") == 2
    assert "3rd chat turn" in text and "Training step" in text and "Trained model" in text
    # a second run reuses the built models
    assert (work / "hf" / "config.json").is_file() and (work / "mm" / "config.json").is_file()


def test_bench_memory_rows_in_a_fresh_process(tmp_path):
    from mmbridge.commands.bench import build_pair, memory_rows

    hf_dir, mm_dir = build_pair(tmp_path, "tiny")
    (row,) = memory_rows(hf_dir, mm_dir, [("mmbridge", "int8")])
    assert "error" not in row, row
    assert row["peak_rss_mb"] > 0 and row["file_mb"] > 0 and row["peak_over_file"] >= row["load_over_file"] > 0


def test_bench_rejects_unknown_options(tmp_path, capsys):
    assert main(["bench", "--llm-size", "tiny", "--options", "fp8", "--out", str(tmp_path)]) == 2
    assert "unknown --options" in capsys.readouterr().err


def test_chat_and_serve_take_the_decode_options(tiny_model_dir, capsys):
    from mmbridge.cli import build_parser
    from mmbridge.serve.cli import _decode_options, _Loader

    assert main(["chat", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "3",
                 "--dtype", "bfloat16", "--quantize", "int8", "--merge-adapters"]) == 0
    from mmbridge.modeling.quantize import QUANTIZE_CHOICES

    quantize = next(a for a in build_parser()._subparsers._group_actions[0].choices["chat"]._actions
                    if a.dest == "quantize")
    assert tuple(quantize.choices) == QUANTIZE_CHOICES  # the CLI spells them out (no torch at parse time)
    for command in ("serve", "ui"):
        args = build_parser().parse_args([command, "--model", str(tiny_model_dir), "--quantize", "int8",
                                          "--merge-adapters", "--dtype", "bfloat16"])
        options = _decode_options(args)
        assert options == {"dtype": torch.bfloat16, "quantize": "int8", "merge_adapters": True}
    pipeline = _Loader(tiny_model_dir, MMBridgePipeline, **options)()
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in pipeline.model.llm.modules())


def test_merging_adapters_keeps_the_answers(tiny):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from mmbridge.generation.decode_options import merge_adapters_

    model, processor, batches = tiny
    adapted = copy.deepcopy(model)
    adapted.add_llm_lora({"r": 4, "target_modules": ["q_proj", "v_proj"]})
    adapted.llm.add_special_tokens(["[T0]"], copy.deepcopy(processor.tokenizer), adapted.config)  # trainable rows
    with torch.no_grad():
        for name, param in adapted.llm.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.normal_(std=0.5)  # make the adapters matter
    adapted.eval()
    merged = copy.deepcopy(adapted)
    assert merge_adapters_(merged.llm.model) >= 3
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    inputs = {k: v for k, v in batches[0].items() if k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_int8_linear_prefill_path_matches_the_decode_kernel():
    """Many rows (a prefill) widen the int8 weight for one bf16 GEMM; few rows call the int8 kernel: the
    same quantized weights, so the same outputs up to bf16 rounding."""
    from mmbridge.modeling.quantize import PREFILL_ROWS

    torch.manual_seed(0)
    quantized = Int8WeightOnlyLinear.from_linear(torch.nn.Linear(64, 48))
    x = torch.randn(PREFILL_ROWS, 64)
    with torch.no_grad():
        together = quantized(x)  # one call: the prefill path
        one_by_one = torch.cat([quantized(row[None]) for row in x])  # the kernel
    torch.testing.assert_close(together, one_by_one, rtol=0.02, atol=0.02)
