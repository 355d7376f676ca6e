import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmbridge.cli import build_parser, main


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_help_lists_every_command():
    script = Path(sys.executable).with_name("mmbridge")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    registered = build_parser()._subparsers._group_actions[0].choices
    for command in registered:
        assert command in out
    assert {"demo", "chat"} <= set(registered)


def test_chat_with_prompt_prints_the_answer(tiny_model_dir, tiny_pipeline, image_file, capsys):
    code = main(["chat", "--model", str(tiny_model_dir), "--image", str(image_file), "--prompt", "What is this?",
                 "--max-new-tokens", "8"])
    assert code == 0
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    expected = tiny_pipeline.generate(question, images=[str(image_file)], max_new_tokens=8)[0].text
    assert capsys.readouterr().out == expected + "\n"


def test_interactive_chat_runs_several_turns(tiny_model_dir, image_file, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {image_file}\nWhat is this?\nAnd now?\n/quit\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_chat_errors_are_one_line_without_traceback(tiny_model_dir, tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "neither a model directory" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["chat", "--model", str(tiny_model_dir), "--image", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "Traceback" not in err
