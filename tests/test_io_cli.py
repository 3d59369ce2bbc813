"""Image/question checks and the CLI end to end on the tiny checkpoint."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vtc.cli import app
from vtc.io import check_question, load_image
from vtc.methods import VTCError, available

runner = CliRunner()


def test_modes_are_converted_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white background
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0, 10, 10, 10, 20, 20, 20, 200, 100, 50] + [0] * 756)
    assert load_image(palette).getpixel((1, 1)) == (200, 100, 50)
    deep = Image.fromarray(np.array([[1000, 3000], [5000, 65535]], dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    out = load_image(deep)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert load_image(cmyk).getpixel((0, 0)) == (255, 0, 0)
    grey = Image.new("L", (4, 4), 9)
    assert load_image(grey).getpixel((0, 0)) == (9, 9, 9)


def test_unreadable_truncated_and_tiny_images(tmp_path):
    with pytest.raises(VTCError, match="no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(VTCError, match="cannot be read"):
        load_image(tmp_path / "notes.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(VTCError, match="truncated"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(VTCError, match="1x1"):
        load_image(Image.new("RGB", (1, 1)))
    with pytest.raises(VTCError, match="PIL image"):
        load_image(42)


def test_questions():
    assert check_question("  what?  ") == "what?"
    for bad, match in [("", "empty"), ("\n\t", "empty"), (None, "expected text"), ("x" * 5000, "at most")]:
        with pytest.raises(VTCError, match=match):
            check_question(bad)


def test_methods_command_lists_every_method_with_signals():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == available()
    assert {"features", "cls_attn", "keys", "text_sim"} == set(next(r for r in rows if r["name"] == "recoverable")["needs"])
    by_name = {r["name"]: r for r in rows}
    for name in ("fastervlm", "visionzip", "divprune", "fopru-rank", "fopru-row", "tome", "evit", "todre", "downsample"):
        assert "arXiv" in by_name[name]["paper"], name  # every zoo method cites its paper
    assert by_name["visionzip"]["code"] == "https://github.com/dvlab-research/VisionZip"
    assert "received_attn" in by_name["fopru-rank"]["needs"] and by_name["fopru-rank"]["attention"].startswith("layer -2")
    assert by_name["divprune"]["token_pairs"] and not by_name["fastervlm"]["token_pairs"]
    # which families serve each method, and how (LLaVA-NeXT refuses downsample, pools per tile)
    assert by_name["downsample"]["families"]["llava-next"].startswith("no (")
    assert by_name["pool"]["families"] == {**by_name["pool"]["families"], "llava-1.5": "one grid", "llava-next": "per tile"}
    assert by_name["fastervlm"]["families"]["llava-next"] == "global or per tile"
    assert by_name["fastv"]["families"]["llava-next"] == "in the LLM"


def test_run_json(tiny_dirs, tmp_path):
    llava, clip = tiny_dirs
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "red.png")
    args = ["run", "--model", str(llava), "--clip", str(clip), "--image", str(tmp_path / "red.png"),
            "--question", "what is the color ?", "--method", "recoverable", "--budget", "auto", "--json",
            "--max-new-tokens", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"text", "method", "budget", "tokens_before", "tokens_after", "prefill_ms"} <= set(record)
    assert record["method"] == "recoverable" and record["tokens_before"] == 16
    assert 1 <= record["tokens_after"] <= 16


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--budget", "0"], "at least 1"),
        (["--budget", "999"], "more than the image's 16"),
        (["--question", ""], "question 0 is empty"),
        (["--image", "/nonexistent.png"], "no such file"),
    ],
)
def test_run_bad_input_gives_clear_errors(tiny_dirs, tmp_path, extra, message):
    llava, _ = tiny_dirs
    Image.new("RGB", (50, 40)).save(tmp_path / "img.png")
    base = {"--model": str(llava), "--image": str(tmp_path / "img.png"), "--question": "what ?", "--method": "pool", "--budget": "4"}
    for flag, value in zip(extra[::2], extra[1::2]):
        base[flag] = value
    args = ["run"] + [x for kv in base.items() for x in kv]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_run_chains_a_vision_and_an_in_llm_method(tiny_dirs, tmp_path):
    llava, clip = tiny_dirs
    Image.new("RGB", (50, 40), (20, 30, 200)).save(tmp_path / "blue.png")
    args = ["run", "--model", str(llava), "--clip", str(clip), "--image", str(tmp_path / "blue.png"), "--question", "what is the color ?",
            "--method", "pool>fastv", "--budget", "8>0.5", "--json", "--max-new-tokens", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "within 1..1" in result.output  # the tiny LLM has 2 layers: FastV's default K=2 is refused
    bad = runner.invoke(app, args[:-5] + ["--budget", "8", "--json"])
    assert bad.exit_code == 2 and "two budgets" in bad.output


# ----------------------------------------------------------------------------- special tokens in a question


def _every_special_token(tokenizer) -> set[str]:
    # read off the tokenizer itself (its special-token attributes and its added tokens), not off the pipeline
    found = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token}
    found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return found - {None}


def test_every_special_token_in_a_question_is_refused_by_the_pipeline(tiny_pipe, images):
    specials = _every_special_token(tiny_pipe.processor.tokenizer)
    assert {"<image>", "<s>", "</s>", "<pad>", "<unk>"} <= specials
    for token in sorted(specials):
        with pytest.raises(VTCError, match=f"question 1 contains '{token}', a special token"):
            tiny_pipe(images[:2], ["what color ?", f"what is {token} this {token}"], method="pool", budget=4, max_new_tokens=1)
    # text that only looks like a token is fine
    [r] = tiny_pipe(images[:1], ["what is <img> or image ?"], method="pool", budget=4, max_new_tokens=1)
    assert r.tokens_after == 4


def test_every_special_token_in_a_question_is_refused_by_the_cli(tiny_dirs, tiny_pipe, tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "img.png")
    for token in sorted(_every_special_token(tiny_pipe.processor.tokenizer)):
        args = ["run", "--model", str(tiny_dirs[0]), "--image", str(tmp_path / "img.png"), "--question", f"what is {token} this {token}",
                "--method", "pool", "--budget", "4"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (token, result.output)
        assert f"contains '{token}'" in result.output.replace("\n", " ") and "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


# ----------------------------------------------------------------------------- dtype and device


def test_dtype_auto_is_float32_on_cpu_and_float16_on_cuda(tiny_dirs):
    import torch

    from vtc.pipeline import Pipeline, resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16 and resolve_dtype(torch.float16, torch.device("cpu")) is torch.float16
    for bad, match in [("fp8", "not one of auto"), (torch.int8, "not a floating-point")]:
        with pytest.raises(VTCError, match=match):
            resolve_dtype(bad, torch.device("cpu"))
    pipe = Pipeline.from_pretrained(tiny_dirs[0], clip=tiny_dirs[1], device="cpu")
    assert pipe.model.dtype == torch.float32 and pipe.adapter.text_scorer.projection.dtype == torch.float32
    half = Pipeline.from_pretrained(tiny_dirs[0], dtype="bfloat16", device="cpu")
    assert half.model.dtype == torch.bfloat16
    with pytest.raises(VTCError, match="not a torch device"):
        Pipeline.from_pretrained(tiny_dirs[0], device="gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(VTCError, match="CUDA is not available"):
            Pipeline.from_pretrained(tiny_dirs[0], device="cuda")


def test_cli_dtype_option(tiny_dirs, tmp_path):
    Image.new("RGB", (50, 40)).save(tmp_path / "img.png")
    base = ["run", "--model", str(tiny_dirs[0]), "--image", str(tmp_path / "img.png"), "--question", "what ?", "--method", "pool", "--budget", "4"]
    bad = runner.invoke(app, base + ["--dtype", "fp8"])
    assert bad.exit_code == 2 and "dtype 'fp8' is not one of auto" in bad.output and "Traceback" not in bad.output
    good = runner.invoke(app, base + ["--dtype", "float32", "--json", "--max-new-tokens", "1"])
    assert good.exit_code == 0, good.output
