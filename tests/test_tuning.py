"""Tuned dispatch defaults (fastlora/tuning.py): the file format, where it lives, what a bad file does, and that
torch.compile sees the tuned value as a constant (no graph break in the LoRA dispatch)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from fastlora import tuning

# the module (fastlora.ops re-exports its function under the same name)
lora_linear_module = importlib.import_module("fastlora.ops.lora_linear")


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLORA_TUNED_DIR", str(tmp_path / "tuned"))
    tuning.clear_cache()
    yield tmp_path / "tuned"
    tuning.clear_cache()


def test_device_key_is_a_safe_file_name():
    assert tuning.device_key("NVIDIA H100 80GB HBM3", (9, 0)) == "NVIDIA-H100-80GB-HBM3-sm90"
    assert tuning.device_key("A100-SXM4-40GB / MIG 1g.5gb", (8, 0)) == "A100-SXM4-40GB-MIG-1g.5gb-sm80"
    assert tuning.device_key("///", (8, 6)) == "gpu-sm86"


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLORA_TUNED_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tuning.tuned_dir() == tmp_path / ".cache" / "fastlora" / "tuned"


def test_save_load_and_lookup(tuned):
    assert tuning.cuda_max_rows("G-sm90", 4096, 4096, 16) == 16  # nothing saved: the kernel's limit
    path = tuning.save("G-sm90", {tuning.CUDA_ROWS_KEY: {"default": 8, "4096x14336": 3, "4096x4096": 99},
                                  "measured": {"note": "test"}})
    assert path == tuned / "G-sm90.json" and json.loads(path.read_text())["measured"] == {"note": "test"}
    assert tuning.cuda_max_rows("G-sm90", 4096, 14336, 16) == 3
    assert tuning.cuda_max_rows("G-sm90", 4096, 1024, 16) == 8  # no entry for the shape: the default
    assert tuning.cuda_max_rows("G-sm90", 4096, 4096, 16) == 16  # never past the kernel's limit
    assert tuning.cuda_max_rows("Other-sm80", 4096, 14336, 16) == 16  # another GPU's file is not this one's


@pytest.mark.parametrize("table", [{"default": -1}, {"default": 2.5}, {"default": True}, ["default", 4], {3: 4}])
def test_save_refuses_a_bad_table(tuned, table):
    with pytest.raises(ValueError, match=tuning.CUDA_ROWS_KEY):
        tuning.save("G-sm90", {tuning.CUDA_ROWS_KEY: table})
    assert not (tuned / "G-sm90.json").exists()


@pytest.mark.parametrize("text", ["{not json", json.dumps({tuning.CUDA_ROWS_KEY: {"default": "many"}}), "[1, 2]"])
def test_a_bad_file_is_ignored_with_a_warning_naming_it(tuned, text):
    tuned.mkdir(parents=True)
    (tuned / "G-sm90.json").write_text(text)
    with pytest.warns(UserWarning, match="G-sm90.json"):
        assert tuning.cuda_max_rows("G-sm90", 64, 64, 16) == 16


def test_compile_sees_the_tuned_value_as_a_constant(tuned, monkeypatch):
    monkeypatch.setattr(tuning, "key_of", lambda device: "G-sm90")
    tuning.save("G-sm90", {tuning.CUDA_ROWS_KEY: {"default": 5}})

    def f(x):
        return x * lora_linear_module._tuned_cuda_rows(0, 64, 32)

    x = torch.randn(3)
    compiled = torch.compile(f, fullgraph=True, backend="eager")  # fullgraph: a graph break would raise
    torch.testing.assert_close(compiled(x), x * 5)
