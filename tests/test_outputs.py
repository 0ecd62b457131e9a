"""Issue 18 (outputs): the committed executed notebooks read well on GitHub / nbviewer, and the
progress bars and stage lines that produce them (``cip_helpers.course.progress``, ``store.load_or_train``)."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

from cip_helpers.course import progress, store
from cip_helpers.course.config import REPO_ROOT

EXECUTED_DIR = REPO_ROOT / "results" / "quick" / "seed-0" / "executed"
EXECUTED = sorted(EXECUTED_DIR.glob("*.ipynb"))

WARNING = re.compile(r"\b\w*Warning\b|\bwarnings?\.warn\b")
TQDM_PERCENT = re.compile(r"(\d{1,3})%\|")
STAGE_KEYS = (  # (what happened, checkpoint file) of a stage line, old and new wording
    (re.compile(r"loaded checkpoint (\S+\.pt)"), "loaded"),
    (re.compile(r"no checkpoint (?:at )?(\S+\.pt)"), "trained"),
    (re.compile(r"checkpoint (\S+\.pt) was trained with other settings"), "trained"),
    (re.compile(r"-> (\S+\.pt)"), "trained"),
)


def _texts(output: dict) -> list[str]:
    """Every text an output shows: a stream's text, an error's traceback, each text MIME type."""
    if output.get("output_type") == "stream":
        return ["".join(output.get("text", ""))]
    if output.get("output_type") == "error":
        return ["\n".join(output.get("traceback", [])), f"{output.get('ename')}: {output.get('evalue')}"]
    texts = []
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/") or mime.endswith("json"):
            texts.append(value if isinstance(value, str) else
                         "".join(value) if isinstance(value, list) else json.dumps(value))
    return texts


def _short(text: str, at: int = 0, width: int = 160) -> str:
    start = max(0, at - width // 2)
    return repr(text[start:start + width])


def output_problems(path: Path) -> list[str]:
    """What a reader of the executed copy ``path`` should not see, one message per finding
    (notebook, cell index, rule, the offending text)."""
    nb = json.loads(path.read_text())
    problems: list[str] = []
    stages: dict[tuple[str, str], list[int]] = defaultdict(list)

    def flag(index: int, rule: str, text: str, at: int = 0) -> None:
        problems.append(f"{path.name} cell {index}: {rule}: {_short(text, at)}")

    for index, cell in enumerate(nb.get("cells", [])):
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            texts = _texts(output)
            if kind == "error":
                flag(index, "error output", texts[1])
            if kind == "stream" and output.get("name") == "stderr":
                flag(index, "stderr output (a warning or a text progress bar)", texts[0])
            widget = "application/vnd.jupyter.widget-view+json" in output.get("data", {})
            for text in texts:
                for pattern, rule in (("PosixPath(", "PosixPath repr"), ("Traceback", "traceback")):
                    if pattern in text:
                        flag(index, rule, text, text.index(pattern))
                if (m := WARNING.search(text)) is not None:
                    flag(index, "warning", text, m.start())
                for m in TQDM_PERCENT.finditer(text):
                    if int(m.group(1)) < 100:
                        flag(index, "unfinished progress bar" + (" widget (it keeps the text of its first "
                                                                 "state)" if widget else ""), text, m.start())
                        break
                if kind == "stream" and "\r" in text:
                    flag(index, "carriage return (progress-bar debris)", text, text.index("\r"))
            if kind == "stream" and output.get("name") == "stdout":
                for line in texts[0].splitlines():
                    for pattern, what in STAGE_KEYS:
                        if (m := pattern.search(line)) is not None:
                            stages[(what, m.group(1))].append(index)
                            break
    for (what, checkpoint), cells in stages.items():
        if len(cells) > 1:
            where = ", ".join(str(i) for i in sorted(set(cells)))
            problems.append(f"{path.name} cell {where}: {checkpoint} {what} {len(cells)} times "
                            "(one line per stage)")
    return problems


def test_the_quick_executed_copies_are_committed():
    assert EXECUTED, f"no executed notebooks in {EXECUTED_DIR}"


@pytest.mark.parametrize("path", EXECUTED, ids=[p.stem[:2] for p in EXECUTED])
def test_executed_copy_reads_well(path):
    """No error, traceback, warning, PosixPath repr, saved progress bar or repeated stage line in a
    committed executed copy (they are read on GitHub / nbviewer)."""
    problems = output_problems(path)
    assert not problems, f"{len(problems)} problem(s) in the executed copy {path}:\n" + "\n".join(problems)


def test_output_checker_flags_each_rule(tmp_path):
    import nbformat

    bar = "knockoff_none_hard:   0%|          | 0/6 [00:00<?, ?it/s]"
    outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="results go to PosixPath('/tmp/x')\n"),
        nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=["Traceback (most recent call last)"]),
        nbformat.v4.new_output("stream", name="stderr", text="/x.py:3: UserWarning: careful\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": bar,
                                                     "application/vnd.jupyter.widget-view+json": {"model_id": "a"}}),
        nbformat.v4.new_output("stream", name="stdout", text="s: loaded checkpoint s.pt (same settings)\n"
                                                             "s: loaded checkpoint s.pt (same settings)\n"),
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=outputs)])
    path = tmp_path / "07_x.ipynb"
    nbformat.write(nb, path)
    found = "\n".join(output_problems(path))
    for rule in ("PosixPath repr", "error output", "traceback", "stderr output", "warning",
                 "unfinished progress bar widget", "s.pt loaded 2 times"):
        assert rule in found, rule
    assert "07_x.ipynb cell 0" in found
    clean = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stdout",
                               text="s: trained 6/6 epochs in 1.0 s -> s.pt\ns: loaded checkpoint s.pt (same settings)\n"
                                    "innocent pool: 8/8 models in 0.1 s\n")])])
    nbformat.write(clean, path)
    assert output_problems(path) == []


# ------------------------------------------------------------------ cip_helpers.course.progress


@pytest.fixture
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(progress, "_announced", set())  # every announce_once line prints again


def test_batch_bar_prints_one_line_at_the_end(monkeypatch, capsys):
    monkeypatch.setenv(progress.BATCH_ENV, "1")
    bar = progress.progress(range(6), desc="knockoff_none_hard")
    assert isinstance(bar, progress.BatchBar)
    for epoch in bar:
        bar.set_postfix({"loss": 1.0 / (epoch + 1), "test_acc": 0.55})
    out, err = capsys.readouterr()
    assert err == "" and "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("knockoff_none_hard: 6/6 epochs in ") and "test_acc=0.55" in lines[0]
    for _ in progress.progress(3, desc="quiet", disable=True):  # disable: nothing, in batch too
        pass
    for _ in progress.progress(range(1), desc="one", unit="model"):
        pass
    out, err = capsys.readouterr()
    assert re.fullmatch(r"one: 1/1 model in \d+\.\d s\n", out) and err == ""


def test_interactive_bar_is_tqdm_auto(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.delenv(progress.BATCH_ENV, raising=False)
    bar = progress.progress(range(3), desc="live")
    try:
        assert type(bar) is tqdm and not isinstance(bar, progress.BatchBar)
        assert list(bar) == [0, 1, 2]
    finally:
        bar.close()


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _train_with_bar(model: nn.Module) -> dict:
    bar = progress.progress(range(6), desc="stage_x")
    for _ in bar:
        bar.set_postfix({"test_acc": 0.5})
    return {}


def test_batch_stage_is_one_line_and_a_reused_checkpoint_is_announced_once(tmp_path, monkeypatch, capsys,
                                                                           fresh_announcements):
    monkeypatch.setenv(progress.BATCH_ENV, "1")
    path = tmp_path / "stage_x.pt"
    store.load_or_train(path, {"epochs": 6}, _tiny, _train_with_bar, name="stage_x")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage_x: trained 6/6 epochs in "), lines
    assert lines[0].endswith("-> stage_x.pt"), lines
    for _ in range(3):  # e.g. notebook 10: the same surrogate for every DQA ratio
        _, info = store.load_or_train(path, {"epochs": 6}, _tiny, _train_with_bar, name="stage_x")
        assert info["loaded"]
    assert capsys.readouterr().out == ("stage_x: loaded checkpoint stage_x.pt (same settings; "
                                       "delete it to retrain)\n")
    store.load_or_train(path, {"epochs": 7}, _tiny, _train_with_bar, name="stage_x")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage_x: retrained 6/6 epochs"), lines
    assert "other settings (epochs)" in lines[0]
    store.load_or_train(path, {"epochs": 7}, _tiny, _train_with_bar, name="stage_x")  # a new file: said again
    assert "loaded checkpoint stage_x.pt" in capsys.readouterr().out
    store.load_or_train(tmp_path / "quiet.pt", {}, _tiny, lambda m: {}, verbose=False)
    store.load_or_train(tmp_path / "quiet.pt", {}, _tiny, lambda m: {}, verbose=False)
    store.load_or_train(tmp_path / "nobar.pt", {}, _tiny, lambda m: {})  # no bar: one line all the same
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nobar: trained in ") and lines[0].endswith("-> nobar.pt")


def test_interactive_stage_says_it_before_the_bar_and_loads_once(tmp_path, monkeypatch, capsys,
                                                                  fresh_announcements):
    monkeypatch.delenv(progress.BATCH_ENV, raising=False)
    path = tmp_path / "m.pt"
    store.load_or_train(path, {"a": 1}, _tiny, lambda m: {}, name="m")
    assert capsys.readouterr().out == "m: no checkpoint m.pt yet: training\n"
    for _ in range(2):
        store.load_or_train(path, {"a": 1}, _tiny, lambda m: {}, name="m")
    assert capsys.readouterr().out == "m: loaded checkpoint m.pt (same settings; delete it to retrain)\n"
