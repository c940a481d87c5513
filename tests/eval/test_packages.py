"""`lora-run check` warns before training when the evaluation the recipe asks for could not run: a plain
`pip install lora-run` has no `eval` extra, and the run would train and only then skip its evaluation."""
from __future__ import annotations

import pytest

from lora_run.cli import main


@pytest.fixture(scope="module")
def demo_recipe(tmp_path_factory):
    from lora_run_native.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "assets")


def check(recipe, capsys, *sets: str) -> tuple[int, str]:
    args = ["check", str(recipe)]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_missing_embedder_package_is_named_before_training(demo_recipe, capsys, monkeypatch):
    from lora_run_eval import faces

    code, text = check(demo_recipe, capsys)
    assert code == 0 and "eval-packages-missing" not in text, text      # this environment has the eval extra
    # planted: the dlib embedder needs a distribution that is not installed
    monkeypatch.setitem(faces.NEEDS, "dlib", (*faces.NEEDS["dlib"], ("lora_run_no_such_module", "imaginary-dist")))
    code, text = check(demo_recipe, capsys)
    assert code == 0, text                     # a warning: the LoRA still trains
    assert "eval-packages-missing" in text and "imaginary-dist" in text and "lora-run[eval]" in text, text
    assert "dlib-bin" not in text.split("eval-packages-missing", 1)[1].splitlines()[0]   # only what is missing
    # no evaluation asked for, or one that does not use the face embedder: nothing to warn about
    for sets in (("eval.enabled=false",), ("eval.evaluators=[]",)):
        code, text = check(demo_recipe, capsys, *sets)
        assert code == 0 and "eval-packages-missing" not in text, (sets, text)


def test_only_built_in_embedders_are_looked_up():
    from lora_run_eval.faces import missing_packages

    assert missing_packages("dlib") == [] and missing_packages("onnx") == []
    assert missing_packages("someone-elses-embedder") == []
