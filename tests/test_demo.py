"""``python -m fastlora demo`` end to end on the tiny preset: the files it writes, the loss falling in both
runs, the saved adapter loading into PEFT with the tuned model's logits, the measurements on known cases,
the shipped corpus being the generator's output, and user errors (message, exit status 2, no traceback)."""

import copy
import json
import os
import sys

import pytest
import torch

import fastlora
from fastlora.__main__ import main
from fastlora.demo import corpus, generate, make_corpus, models, presets
from fastlora.demo.measure import PeakTensorMemory, SavedTensorBytes
from fastlora.demo.train import without_noise

transformers = pytest.importorskip("transformers")

STEPS = 30  # tiny preset, lr 1e-2: the held-out loss falls from ~7.9 to ~4.3 (seed 0)
FILES = ["table.md", "table.json", "loss_curves.csv", "loss_curves.json", "loss_curves.png", "generation.txt",
         "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
OPTIONS = ["--preset", "--steps", "--batch", "--seq-len", "--rank", "--alpha", "--lr", "--neftune-alpha", "--dtype",
           "--output", "--no-compare", "--device", "--seed"]


def _demo(capsys, *args):
    code = main(["demo", "--preset", "tiny", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One demo run with the PEFT + bitsandbytes comparison; returns (folder, stdout)."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    folder = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--preset", "tiny", "--steps", str(STEPS), "--device", "cpu", "--output", str(folder)])
    assert code == 0
    return folder, out.getvalue()


def test_compare_run_writes_every_file(compared):
    folder, out = compared
    for name in FILES:
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    table = json.loads((folder / "table.json").read_text())
    assert set(table["runs"]) == {"fastlora", "PEFT + bitsandbytes"}
    md = (folder / "table.md").read_text()
    assert "| fastlora | PEFT + bitsandbytes | fastlora vs PEFT |" in md and md in out
    assert "losses agree in distribution, not step by step" in md  # NEFTune on (the default): its own noise per run
    curves = json.loads((folder / "loss_curves.json").read_text())
    assert {k: len(v) for k, v in curves.items()} == {"fastlora": STEPS, "PEFT + bitsandbytes": STEPS}
    csv_lines = (folder / "loss_curves.csv").read_text().splitlines()
    assert csv_lines[0] == "step,fastlora,PEFT + bitsandbytes" and len(csv_lines) == STEPS + 1
    assert (folder / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key, value in table["ratios"].items():
        mine, theirs = table["runs"]["fastlora"][key], table["runs"]["PEFT + bitsandbytes"][key]
        expected = theirs / mine if key == "step_time_ms" else mine / theirs
        assert value == pytest.approx(expected), key


def test_loss_falls_in_both_runs(compared):
    folder, _ = compared
    runs = json.loads((folder / "table.json").read_text())["runs"]
    for name, r in runs.items():
        assert r["train_loss_final"] < r["train_loss_first"] - 1.0, (name, r)
        assert r["eval_loss_end"] < r["eval_loss_start"] - 1.0, (name, r)
    # Same weights, batches and optimizer: the two runs end close (NEFTune's noise differs between them).
    a, b = runs["fastlora"]["eval_loss_end"], runs["PEFT + bitsandbytes"]["eval_loss_end"]
    assert abs(a - b) < 0.3
    # Both start from the same model: the same held-out loss before training.
    assert runs["fastlora"]["eval_loss_start"] == pytest.approx(runs["PEFT + bitsandbytes"]["eval_loss_start"],
                                                                rel=1e-5)


def test_fastlora_saves_less_for_backward_than_peft(compared):
    folder, _ = compared
    runs = json.loads((folder / "table.json").read_text())["runs"]
    ours, theirs = runs["fastlora"], runs["PEFT + bitsandbytes"]
    assert 0 < ours["saved_activations_mib"] < theirs["saved_activations_mib"]
    assert 0 < ours["peak_step_memory_mib"] and 0 < theirs["peak_step_memory_mib"]


def _held_out(seq_len=64):
    tok = corpus.ByteTokenizer()
    b = corpus.Batches(tok.encode(corpus.load_corpus()), batch=4, seq_len=seq_len, seed=0)
    return b.eval_batches()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's call
def test_saved_adapter_loads_into_peft_with_the_tuned_models_logits(compared):
    peft = pytest.importorskip("peft")
    folder, _ = compared
    table = json.loads((folder / "table.json").read_text())
    base = presets.build_model(presets.PRESETS["tiny"], corpus.ByteTokenizer.vocab_size, seed=0, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(models.to_bnb_4bit(copy.deepcopy(base)), str(folder / "adapter"))
    ours = copy.deepcopy(base)
    fastlora.patch(ours, quantize="nf4")
    fastlora.load_adapter(ours, str(folder / "adapter"))
    bare = copy.deepcopy(base)
    fastlora.patch(bare, quantize="nf4")
    batches = _held_out()
    # Not eval(): see train.without_noise (bitsandbytes' CPU inference format computes in bf16).
    with without_noise(theirs), without_noise(ours), without_noise(bare):
        for ids in batches:
            torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        loss = sum(theirs(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
        untuned = sum(bare(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)
    # The demo measured the tuned model's held-out loss on these very windows.
    assert loss == pytest.approx(table["runs"]["fastlora"]["eval_loss_end"], rel=1e-4)
    assert loss < untuned - 1.0
    # And the greedy text it printed comes out of PEFT's model too.
    text = generate.greedy(theirs, corpus.ByteTokenizer(), generate.PROMPT, generate.GENERATED_BYTES,
                           torch.device("cpu"))
    assert (folder / "generation.txt").read_text() == generate.PROMPT + text + "\n"


def test_no_compare_runs_fastlora_only(tmp_path, capsys):
    code, out, err = _demo(capsys, "--steps", "4", "--no-compare", "--output", str(tmp_path), "--device", "cpu")
    assert code == 0, err
    table = json.loads((tmp_path / "table.json").read_text())
    assert list(table["runs"]) == ["fastlora"] and table["settings"]["compare_skipped"] == "--no-compare"
    assert "PEFT + bitsandbytes comparison skipped: --no-compare" in out
    assert "PEFT" not in (tmp_path / "table.md").read_text().split("\n\n")[1]
    for name in FILES:
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "loss_curves.csv").read_text().splitlines()[0] == "step,fastlora"


def test_bf16_and_no_neftune(tmp_path, capsys):
    code, out, err = _demo(capsys, "--steps", "3", "--no-compare", "--dtype", "bf16", "--neftune-alpha", "0",
                           "--rank", "4", "--alpha", "8", "--batch", "2", "--seq-len", "16", "--output", str(tmp_path),
                           "--device", "cpu")
    assert code == 0, err
    assert "NEFTune embedding" not in out and "LoRA r=4 alpha=8" in out
    assert json.loads((tmp_path / "table.json").read_text())["settings"]["dtype"] == "bf16"


def test_without_matplotlib_the_plot_is_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = _demo(capsys, "--steps", "3", "--no-compare", "--output", str(tmp_path), "--device", "cpu")
    assert code == 0, err
    assert "matplotlib is not installed: loss_curves.png skipped" in err
    assert not (tmp_path / "loss_curves.png").exists() and (tmp_path / "table.md").is_file()


def test_help_explains_every_option(capsys):
    from fastlora.demo.cli import build_parser

    parser = build_parser()
    assert set(OPTIONS) <= {s for action in parser._actions for s in action.option_strings}
    for action in parser._actions:
        if "-h" in action.option_strings:
            continue
        assert action.help and action.help.strip(), f"{action.option_strings} has no help text"
    assert main(["demo", "--help"]) == 0  # the help also formats: a stray % in a help string raises here
    out = capsys.readouterr().out
    assert "bf16 is slow" in out and "tiny" in out and "small" in out


def _bad_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return str(blocker / "results")


BAD = {
    "unknown preset": (lambda p: ["--preset", "huge"], "unknown --preset 'huge'; choose one of: tiny"),
    "output not writable": (lambda p: ["--output", _bad_output(p)], "cannot write the results there"),
    "corpus too small": (lambda p: ["--seq-len", "250000"], "--seq-len 250000 with --batch 4 needs a corpus"),
    "too few steps": (lambda p: ["--steps", "2"], "--steps must be at least 3, got 2"),
    "negative alpha": (lambda p: ["--alpha", "-1"], "--alpha must be > 0"),
    "negative neftune": (lambda p: ["--neftune-alpha", "-0.5"], "--neftune-alpha must be >= 0"),
    "bad dtype": (lambda p: ["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    "not a number": (lambda p: ["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    "unknown option": (lambda p: ["--fast"], "unrecognized arguments: --fast"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_message_and_exit_2(case, tmp_path, capsys):
    args, message = BAD[case]
    argv = args(tmp_path)
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    code, out, err = _demo(capsys, *argv, "--no-compare")
    assert code == 2
    assert message in err and err.startswith("python -m fastlora demo: error: ")
    assert "Traceback" not in err + out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available here")
def test_cuda_without_gpu_is_a_message(tmp_path, capsys):
    code, out, err = _demo(capsys, "--device", "cuda", "--output", str(tmp_path))
    assert code == 2 and "--device cuda: no CUDA GPU is available" in err and "use --device cpu" in err
    assert "Traceback" not in err + out


def test_shipped_corpus_is_the_generators_output():
    with open(make_corpus.shipped_path(), encoding="utf-8") as f:
        shipped = f.read()
    assert shipped == make_corpus.generate()
    assert 100_000 < len(shipped.encode()) < 400_000 and shipped.isascii()


def test_batches_are_fixed_by_the_seed_and_stay_in_the_training_part():
    ids = torch.arange(1000)
    a = corpus.Batches(ids, batch=3, seq_len=16, seed=5)
    b = corpus.Batches(ids, batch=3, seq_len=16, seed=5)
    for step in range(4):
        x = a.batch_at(step)
        assert torch.equal(x, b.batch_at(step)) and x.shape == (3, 16)
        assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(3, 15, dtype=x.dtype))  # contiguous windows
        assert int(x.max()) < 900  # the last 10% is held out
    assert not torch.equal(a.batch_at(0), corpus.Batches(ids, batch=3, seq_len=16, seed=6).batch_at(0))
    assert all(int(e.min()) >= 900 for e in a.eval_batches())


def test_byte_tokenizer_round_trips():
    tok = corpus.ByteTokenizer()
    text = "The owl said \"h\u00e9llo\" \u2014 twice.\n"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and len(ids) == len(text.encode())
    assert tok.decode(ids.tolist() + [tok.EOS]) == text


def test_saved_tensor_bytes_counts_distinct_storages_and_leaves_out_parameters():
    w = torch.nn.Parameter(torch.randn(8, 5))
    x = torch.randn(3, 8, requires_grad=True)
    with SavedTensorBytes({(w.device.type, w.device.index, w.untyped_storage().data_ptr())}) as saved:
        y = x @ w  # saves x and w: only x counts
        z = y.exp()  # saves its result
        z[:, :2].sum()  # a view of z: nothing new
        (z * z).sum()  # saves z twice: counted once
    assert saved.nbytes == x.nbytes + z.nbytes


def test_peak_tensor_memory_follows_allocations_and_frees():
    kept = torch.randn(1000)
    with PeakTensorMemory(set()) as tracker:
        a = torch.empty(1000)
        b = torch.empty(2000)  # live 3000 floats: the peak
        del a
        c = torch.empty(500)
        view = b[:10]
        del b
        assert tracker.live == 4 * (2000 + 500)  # the view keeps b's storage
        del view
        d = kept + 1  # a new tensor from one that existed before the tracker
        kept.mul_(2)  # in place on an untracked tensor: nothing new
    assert tracker.peak == 4 * (1000 + 2000)
    assert tracker.live == 4 * (500 + 1000)
    del c, d


@pytest.mark.slow
def test_default_preset_runs(tmp_path, capsys):
    code, _, err = main(["demo", "--steps", "4", "--output", str(tmp_path), "--device", "cpu"]), *capsys.readouterr()
    assert code == 0, err
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["settings"]["preset"] == presets.DEFAULT_PRESET and os.path.isfile(tmp_path / "loss_curves.png")
