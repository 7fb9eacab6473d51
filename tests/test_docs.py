"""The README and docs/ as a reader meets them: every command they show (code blocks and inline code) uses
only flags that its program's --help lists, every make target exists, every link and anchor resolves, and
the README stays a front page."""
from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, job_env

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("torchrun", "python", "mnist-dist", "sbatch", "srun", "make")
TRAIN = (sys.executable, "-m", "mnist_dist.train")
CLI = (sys.executable, "-c", "import sys; from mnist_dist.cli import main; sys.exit(main())")


def shown_commands(page: Path) -> list[str]:
    """The command lines a page shows: code-block lines and inline code spans that start with a program
    (after VAR=value assignments and a `$ ` prompt); output lines (`mnist-dist: error: ...`) are not."""
    found, fenced = [], False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        candidates = [line.strip()] if fenced or line.startswith("    ") else re.findall(r"`([^`]+)`", line)
        for text in candidates:
            text = text.removeprefix("$ ")
            words = text.split()
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            if len(words) >= 2 and words[0] in PROGRAMS:  # a lone `python` in prose names a program
                found.append(text)
    return found


@functools.cache
def help_text(*argv: str) -> str:
    res = subprocess.run([*argv, "--help"], cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join(argv)} --help failed: {res.stderr[-2000:]}"
    return res.stdout


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def checks(command: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """(the program whose --help must list them, the flags) for each part of a command; Slurm's own
    options (sbatch's, srun's) are Slurm's and not checked here."""
    words = shlex.split(re.sub(r"\s+#.*$", "", command).replace("[", " ").replace("]", " "))
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words.pop(0)
    prog, rest = words[0], words[1:]
    if prog == "make":
        assert rest[0] in make_targets(), f"make {rest[0]}: no such target in the Makefile"
        args = [w.split("=", 1)[1] for w in rest if w.startswith("ARGS=")]
        return [(TRAIN, shlex.split(args[0]))] if args else []
    if prog == "mnist-dist":
        if rest[:2] == ["init", "--"]:  # a command run under the init
            return checks(shlex.join(rest[2:]))
        if not rest or rest[0].startswith("-"):
            return [(CLI, rest)]
        return [(TRAIN if rest[0] == "train" else (*CLI, rest[0]), rest[1:])]
    if prog == "torchrun":
        if "--no-python" in rest and "mnist-dist" in rest:  # torchrun ... --no-python mnist-dist COMMAND ...
            i = rest.index("mnist-dist")
            return [((sys.executable, "-m", "torch.distributed.run"), rest[:i]), *checks(shlex.join(rest[i:]))]
        if "-m" in rest:
            i = rest.index("-m")
            assert rest[i + 1] == "mnist_dist.train", command
            return [((sys.executable, "-m", "torch.distributed.run"), rest[:i]), (TRAIN, rest[i + 2:])]
        return [((sys.executable, "-m", "torch.distributed.run"), rest)]
    if prog == "python":
        if rest[:2] == ["-m", "mnist_dist.train"]:
            return [(TRAIN, rest[2:])]
        script, rest = rest[0], rest[1:]
        assert (ROOT / script).exists(), f"{script}: no such file"
        own, train = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
        return [((sys.executable, script), own), (TRAIN, train)]
    if prog == "sbatch":
        scripts = [i for i, w in enumerate(rest) if w.startswith("slurm/")]
        assert scripts and (ROOT / rest[scripts[0]]).exists(), f"no script of slurm/ in: {command}"
        return [(TRAIN, rest[scripts[0] + 1:])] if rest[scripts[0]] == "slurm/train.sbatch" else []
    return []  # srun: Slurm's options


def all_commands() -> list[tuple[str, str]]:
    return [(page.relative_to(ROOT).as_posix(), cmd) for page in PAGES for cmd in shown_commands(page)]


def test_the_pages_show_the_commands_users_run():
    """The extraction itself finds what a reader sees: each launcher's example in the README."""
    shown = " ".join(cmd for page, cmd in all_commands() if page == "README.md")
    for example in ("make train", "make test", "torchrun --nproc-per-node=2 -m mnist_dist.train",
                    "sbatch slurm/train.sbatch", "python launch/submit.py", "--wandb", "mnist-dist report"):
        assert example in shown, example


@pytest.mark.parametrize("page,command", all_commands())
def test_every_flag_shown_is_one_the_program_takes(page, command):
    for program, words in checks(command):
        text = help_text(*program)
        stale = [w.split("=", 1)[0] for w in words if w.startswith("-") and w != "--"
                 and not re.search(rf"(?<![\w-]){re.escape(w.split('=', 1)[0])}(?![\w-])", text)]
        assert not stale, f"{page}: `{command}`: {' '.join(program[-1:])} --help lists no {', '.join(stale)}"


def test_the_flags_table_names_only_flags_that_exist():
    """docs/training.md's table of flags: each flag of its first column is in `python -m mnist_dist.train --help`."""
    text, rows = help_text(*TRAIN), 0
    for line in (ROOT / "docs" / "training.md").read_text().splitlines():
        if line.startswith("| `--"):
            rows += 1
            for flag in re.findall(r"--[\w-]+", line.split("|")[1]):
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{flag} is not a flag of train"
    assert rows >= 20


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: link to {target}: no such heading"


def test_the_readme_is_a_front_page():
    """Short enough to read; the rest is one link away."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", readme))
    assert linked == {p.name for p in PAGES[1:]}, "every docs/ page is linked from the README"
