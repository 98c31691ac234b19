"""Every code block and shell command of README.md runs: each ```python block as written (in a fresh interpreter,
in a temporary folder), and each shell command the README shows (every line of an unlabelled fenced block, every
inline code span that starts with python, bash, pip, accelerate or torchrun) from the repository root, with this
interpreter as ``python``.

The commands are parsed out of README.md, never copied here; RULES below only says, per command, how a test runs
it faster (a quick preset, a temporary results folder) and what its output must show. A README command that no
rule matches fails test_every_readme_command_has_a_rule, so a new command cannot go untested."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from itertools import product
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.S | re.M)


def test_readme_images_exist():
    """Every image the README shows is committed (the benchmark charts of a real run, docs/bench/)."""
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", TEXT)
    assert {"docs/bench/speedup.png", "docs/bench/memory.png"} <= set(images)
    for image in images:
        data = (ROOT / image).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, image


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index, tmp_path):
    code = BLOCKS[index]
    if "bitsandbytes" in code or "peft" in code:
        pytest.importorskip("bitsandbytes")
        pytest.importorskip("peft")
        pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"


# ---------------------------------------------------------------------------------------------------------------
# Shell commands


def _split_fences() -> tuple[list[str], str]:
    """(unlabelled fenced blocks, the text outside all fenced blocks). Fences may be indented (list items)."""
    shell, prose, block, lang = [], [], None, None
    for line in TEXT.splitlines():
        fence = re.fullmatch(r" *```(\w*) *", line)
        if fence and block is None:
            block, lang = [], fence.group(1)
        elif fence and not fence.group(1):
            if not lang:
                shell.append("\n".join(block))
            block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    assert block is None, "README.md: unclosed code fence"
    return shell, "\n".join(prose)


SHELL_BLOCKS, PROSE = _split_fences()


def _fenced_commands() -> list[str]:
    """Lines of the unlabelled (shell) fenced blocks; `  # comment` tails dropped."""
    lines = []
    for block in SHELL_BLOCKS:
        for line in block.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def _inline_commands() -> list[str]:
    """Inline code spans of the prose that are commands (start with a program's name: python, bash, pip,
    accelerate, torchrun), line breaks joined."""
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", PROSE))
    return [span for span in spans if re.match(r"(python[\d.]*|bash|pip|accelerate|torchrun) ", span)]


def _variants(command: str) -> list[str]:
    """README notation to concrete commands. `a|b|c` (also `a | b | c`) lists alternatives: each one is a command.
    Optional `[x]` parts: the command without them, and with `--help` when `[--help]` is one of them (the help
    lists the other optional flags, e.g. `--quick`, which RULES use as the fast form of the bare command)."""
    if " && " in command:  # the install one-liners: && chains, no README notation
        return [command]
    optional = re.findall(r"\s*\[([^\]]+)\]", command)
    bare = re.sub(r"\s*\[[^\]]+\]", "", command)
    bare = re.sub(r"\s*\|\s*", "|", bare)
    words = [w.split("|") for w in bare.split()]
    out = [" ".join(choice) for choice in product(*words)]
    if "--help" in optional:
        out += [c + " --help" for c in out]
    return out


CI_COMMAND = next(line for line in (ROOT / ".ci" / "run").read_text().splitlines() if " && " in line)


def readme_commands() -> list[str]:
    """Every concrete shell command the README shows, in order, without repeats. The last part of an install
    one-liner (what runs once installed) is a command of its own too."""
    seen = []
    for command in _fenced_commands() + _inline_commands():
        for v in _variants(command) + ([command.split(" && ")[-1]] if " && " in command else []):
            if v not in seen:
                seen.append(v)
    return seen


class Rule(NamedTuple):
    pattern: str  # matched (re.search) against the README command
    extra: list[str] | None  # arguments appended ("{tmp}": the test's temporary folder); None: not run here
    env: dict[str, str]  # added to the environment
    expect: str | None  # regex the output (stdout + stderr) must match
    marks: list  # pytest marks; "cuda": skipped without a CUDA GPU
    why: str


# The bench files' quick modes: FASTLORA_BENCH_QUICK (bench_lora_linear / _mlp / _neftune: small shapes),
# FASTLORA_TRAIN_BENCH_* (bench_train_step: tiny models, one step), short time budgets. They check that the
# benchmarks run, not the speed.
QUICK_ENV = {"FASTLORA_BENCH_QUICK": "1", "FASTLORA_BENCH_SECONDS": "0.5", "FASTLORA_BENCH_ROUNDS": "1",
             "FASTLORA_BENCH_PEFT_BF16": "first", "FASTLORA_TRAIN_BENCH_PRESET_FP32": "tiny",
             "FASTLORA_TRAIN_BENCH_PRESET_BF16": "tiny", "FASTLORA_TRAIN_BENCH_STEPS": "1",
             "FASTLORA_TRAIN_BENCH_WARMUP": "0"}

# Speed-ups only: each run keeps the README command's own code path. The first matching rule applies.
RULES = [
    Rule(r" && ", None, {}, None, [],
         "install one-liners: tests/test_readme.py::test_install_command checks them against CI's"),
    Rule(r"^python -m pytest -q$", None, {}, None, [],
         "the whole test suite, this file included: CI runs it (.ci/run, checked by "
         "tests/test_readme.py::test_install_command)"),
    Rule(r"^accelerate launch --multi_gpu --num_processes 2 script\.py$", None, {}, None, [],
         "script.py stands for the user's script: tests/test_accelerate_launch.py::"
         "test_accelerate_launch_matches_single_process runs this launch with its worker"),
    Rule(r"^python -m fastlora demo$", ["--preset", "tiny", "--steps", "10", "--output", "{tmp}"], {},
         r"\| fastlora \| PEFT \+ bitsandbytes \| fastlora vs PEFT \|", [],
         "the default (small) preset trains ~2 min per run and runs twice (fastlora, then PEFT + bitsandbytes): "
         "the tiny preset runs the same code in about half a minute (tests/test_demo.py checks its results)"),
    Rule(r"^python -m fastlora demo --device cuda$", ["--preset", "tiny", "--steps", "10", "--output", "{tmp}"], {},
         r"\| fastlora \| PEFT \+ bitsandbytes \| fastlora vs PEFT \|", ["cuda", pytest.mark.slow],
         "on a CUDA GPU, the tiny preset (bench/gpu_check.sh's demo part runs the medium one)"),
    # Commands another test runs already, the same code path with the same quick options (each why names the
    # test: test_covered_commands_name_a_test checks that it exists), so that CI does not run them twice.
    Rule(r"^python -m fastlora compile-check$", None, {}, None, [],
         "tests/test_compile_check.py::report runs this command (with --json), as the suite, under TRITON_INTERPRET=1"),
    Rule(r"^python -m fastlora bench --suite compile$", None, {}, None, [],
         "tests/test_bench_suites.py::test_compile_suite_quick runs this command with --quick"),
    Rule(r"^python -m fastlora bench --suite kernels$", None, {}, None, [],
         "tests/test_bench_suites.py::kernels_run runs it with --quick through fastlora.__main__.main"),
    Rule(r"^python -m fastlora bench --suite train$", None, {}, None, [],
         "tests/test_bench_suites.py::test_train_suite_tiny_one_step runs it with --quick through "
         "fastlora.__main__.main"),
    Rule(r"^python -m fastlora bench --plot$", None, {}, None, [],
         "tests/test_bench_suites.py::test_plot_draws_speedup_png plots a quick kernels-suite run through "
         "fastlora.__main__.main"),
    Rule(r"^python -m fastlora bench --suite memory$", None, {}, None, [],
         "the same run as `python -m fastlora bench --suite memory --model llama-3-8b` (the default --model: "
         "tests/test_readme.py::test_covered_commands_name_a_test checks), which runs below"),
    Rule(r"^python -m pytest bench/bench_(lora_linear|train_step|dequantize|neftune|host_overhead)\.py"
         r"( --benchmark-only -s)?$", None, {}, None, [],
         "the same tests in the same quick mode run in `python -m pytest bench/`: "
         "tests/test_readme.py::test_readme_command_runs"),
    Rule(r" --help$", [], {}, r"(?i)usage:", [], "the help"),
    Rule(r"^python -m fastlora info$", [], {}, r"(?i)torch", [], "as written"),
    Rule(r"^python -m fastlora roundtrip$", ["--repeats", "1"], {}, r"fastlora cpp", [],
         "one timed repetition instead of the best of 5 (same 4096x14336 weight, every backend)"),
    Rule(r"^python -m fastlora bench --suite offload$", ["--quick", "--results", "{tmp}"], {},
         r"\S", [], "--quick: tiny shapes, one timed run per case"),
    Rule(r"^python -m fastlora bench --suite memory --model \S+$",
         ["--seq", "2048", "--checkpointing", "off", "--results", "{tmp}"], {}, r"llama-3-8b +2048 +off +fastlora",
         [pytest.mark.slow], "one of the table's four (seq, checkpointing) cases: each is a FakeTensorMode estimate "
         "of the full model, about a minute on a 2-core CPU (tests/test_memory_estimate.py checks the estimates)"),
    Rule(r"^python -m pytest bench/$", ["-p", "no:cacheprovider"], QUICK_ENV, r" passed", [pytest.mark.slow],
         "every benchmark file in its quick mode (the full sizes take hours on a CPU)"),
    Rule(r"^python bench/bench_lora_linear\.py --quick --backend reference$", [], {}, r"(?i)target", [],
         "as written"),
    Rule(r"^python bench/bench_train_step\.py --dtype bf16 --emulate-no-bf16$",
         ["--preset-bf16", "tiny", "--steps", "1", "--warmup", "0"], {}, r"emulating a CPU without native bf16", [],
         "a tiny model, one step: the small preset takes seconds per step with oneDNN off"),
    Rule(r"^python bench/bench_train_step\.py$",
         ["--preset-fp32", "tiny", "--preset-bf16", "tiny", "--steps", "1", "--warmup", "0"], {}, r" passed", [],
         "tiny models, one step: the full preset takes minutes per step"),
    Rule(r"^python bench/lora_memory\.py$", ["--quick"], {}, r"(?i)fastlora", [],
         "--quick: a small shape instead of 4096x14336 at 1024 tokens, each implementation in its own process"),
    Rule(r"^python bench/bench_lora_cpu_bf16\.py$", ["--quick", "--rounds", "1", "--max-busy", "1.01"], {},
         r"fastlora bf16 GEMM mode +\d+\.\d", [], "small shapes, one round run however busy the CPUs are: the full "
         "run waits for 5 quiet rounds of 1024-token GEMMs (a busy machine measures nothing: inf)"),
    Rule(r"^python -m fastlora bench --suite kernels --device cuda --crossover( --save-tuned)?$",
         ["--quick", "--results", "{tmp}"], {"FASTLORA_TUNED_DIR": "/tmp/fastlora-readme-tuned"},
         r"at least as fast up to M=", ["cuda", pytest.mark.slow], "--quick (one run per case), on a CUDA GPU; "
         "--save-tuned writes to a scratch folder, not the user's cache"),
    Rule(r"^(bash bench/gpu_check\.sh|python (-m pytest )?bench/\w+_gpu\.py( --quick| --benchmark-only -s)?)$",
         [], {}, r"\S", ["cuda", pytest.mark.slow], "as written, on a CUDA GPU"),
]


def _rule(command: str) -> Rule | None:
    return next((r for r in RULES if re.search(r.pattern, command)), None)


COMMANDS = readme_commands()


def test_readme_shows_the_commands():
    assert any(c.endswith("python -m fastlora demo") for c in COMMANDS)
    assert any(c.endswith("python -m pytest -q") for c in COMMANDS)
    assert "python -m pytest bench/bench_lora_linear.py" in COMMANDS
    assert "python bench/lora_memory.py --help" in COMMANDS and "python bench/lora_memory.py" in COMMANDS


def test_readme_notation():
    assert _variants("python m.py a|b [--quick] [--help]") == ["python m.py a", "python m.py b",
                                                                "python m.py a --help", "python m.py b --help"]
    assert _variants("python -m m info | roundtrip") == ["python -m m info", "python -m m roundtrip"]
    assert _variants("bash s.sh [lora] [neftune]") == ["bash s.sh"]
    assert _variants("a && b | c") == ["a && b | c"]


def test_every_readme_command_has_a_rule():
    assert [c for c in COMMANDS if _rule(c) is None] == []


def test_covered_commands_name_a_test():
    """A command not run here names the test that runs it (or checks it), and that test exists."""
    for rule in RULES:
        named = re.findall(r"tests/(\w+\.py)::(\w+)", rule.why)
        assert named or rule.extra is not None, f"rule {rule.pattern!r} runs nothing and names no test"
        for path, name in named:
            assert f"def {name}(" in (ROOT / "tests" / path).read_text(), f"{rule.pattern!r}: no {path}::{name}"
    # `bench --suite memory` is left to the `--model llama-3-8b` command, the same run while that is the default
    from fastlora.bench import build_parser

    assert build_parser("memory").parse_args(["--suite", "memory"]).model == "llama-3-8b"


def _run(command: str, tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs a README command from the repository root, `python` being this interpreter, with the rule's speed-up."""
    rule = _rule(command)
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    argv += [a.replace("{tmp}", str(tmp_path)) for a in rule.extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **rule.env)
    # In the README `python` is the activated venv's: scripts that call python / python3 themselves get this one.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _params():
    params = []
    for command in COMMANDS:
        rule = _rule(command)
        if rule is None or rule.extra is None:
            continue
        marks = [m for m in rule.marks if m != "cuda"]
        params.append(pytest.param(command, marks=marks, id=command))
    return params


@pytest.mark.parametrize("command", _params())
def test_readme_command_runs(command, tmp_path):
    rule = _rule(command)
    if "cuda" in rule.marks:
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available() or (command.startswith("bash") and shutil.which("nvcc") is None):
            pytest.skip(f"{rule.why}: needs a CUDA GPU" + (" and nvcc" if command.startswith("bash") else ""))
    if re.search(r"bench|demo", command):
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
        pytest.importorskip("bitsandbytes")
    done = _run(command, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README command failed: {command} ({rule.why})\n{output[-6000:]}"
    assert re.search(rule.expect, output), f"{command}: output does not match {rule.expect!r}\n{output[-6000:]}"


def test_install_command():
    """The quick-start one-liners install exactly as CI does (.ci/run) apart from the extra, which must exist.
    The one ending in the test command is CI's command itself: CI runs it on every push, and it is this test
    suite, so it is not run again here. The others' last part (the demo) runs in test_readme_command_runs."""
    installs = [c for c in COMMANDS if " && " in c]
    assert len(installs) >= 2, installs
    # tomllib is 3.11+ and the project supports 3.10: the extras' names from their `name = [` lines.
    table = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = re.findall(r"^(\w+) = \[", table, flags=re.M)
    ci_parts = CI_COMMAND.split(" && ")
    extra = re.compile(r'^(pip install .*-e )"\.\[(\w+)\]"$')
    for command in installs:
        parts = command.split(" && ")
        assert len(parts) == len(ci_parts) and parts[:-2] == ci_parts[:-2], (command, CI_COMMAND)
        mine, ci = extra.match(parts[-2]), extra.match(ci_parts[-2])
        assert mine and ci and mine.group(1) == ci.group(1), (parts[-2], ci_parts[-2])
        assert mine.group(2) in extras, f"{command}: no extra {mine.group(2)!r} in pyproject.toml"
        if parts[-1] == ci_parts[-1]:
            assert command == CI_COMMAND
        else:
            assert _rule(parts[-1]).extra is not None, f"{parts[-1]} is not run by test_readme_command_runs"
    assert CI_COMMAND in installs, "the README's test command is not the one CI runs"
