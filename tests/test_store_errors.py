"""Bad input to the store: one clear line, and nothing the user had is lost or half-written.

Each refusal is checked for its message and for the store being left as it was
(no run directory for a refused new run; an earlier run still reads back the same).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from tests.test_store import CTX, expected_tokens, scan_all, write_corpus
from tests.tiny import build_tiny_model
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.model import load_model
from workbench.store import ActivationStore, job_name, model_name

SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "words.txt", n_docs=30)


@pytest.fixture
def store(tmp_path):
    return ActivationStore(tmp_path / "ws")


def cache(store, model, corpus, tokens=4 * CTX, sites=SITES, **kw):
    kw.setdefault("context", CTX)
    kw.setdefault("batch_size", 4)
    return store.cache(model, sites, tokens, corpus=str(corpus), progress=False, **kw)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def test_unknown_site_lists_the_valid_ones_and_writes_nothing(store, tiny_model, corpus):
    with pytest.raises(WorkbenchError) as e:
        cache(store, tiny_model, corpus, sites=["blocks.0.hook_resid_post", "blocks.7.hook_mlp_out"])
    message = one_line(e)
    assert "blocks.7.hook_mlp_out" in message and "hook_resid_pre" in message and "attn.hook_z" in message
    assert not store.workspace.store_dir.exists()


@pytest.mark.parametrize("tokens, fragment", [(0, "positive"), (-5, "positive"), (2.5, "positive")])
def test_token_count_must_be_positive(store, tiny_model, corpus, tokens, fragment):
    with pytest.raises(WorkbenchError, match=fragment) as e:
        cache(store, tiny_model, corpus, tokens=tokens)
    one_line(e)
    assert not store.workspace.store_dir.exists()


def test_other_bad_requests(store, tiny_model, corpus):
    for kwargs, fragment in [
        ({"context": 4096}, "longer than the 128 positions"),
        ({"context": 1}, "at least 2"),
        ({"sites": ["blocks.0.hook_resid_post", "blocks.0.hook_resid_post"]}, "listed twice"),
        ({"sites": ["blocks.0.attn.hook_pattern"]}, "not a per-token activation"),
        ({"sites": []}, "no sites"),
        ({"dtype": "int8"}, "unknown storage dtype"),
        ({"run": "../escape"}, "bad run name"),
        ({"batch_size": 0}, "batch_size"),
    ]:
        with pytest.raises(WorkbenchError, match=fragment) as e:
            cache(store, tiny_model, corpus, **kwargs)
        one_line(e)
    assert not store.workspace.store_dir.exists()


def test_width_mismatch_with_an_existing_table(tmp_path, tokenizer, corpus):
    """The same model name now gives a different width (rebuilt with d_model 64): refused, the old run intact."""
    directory = build_tiny_model("gpt2", tmp_path / "model", tokenizer, d_model=32)
    store = ActivationStore(tmp_path / "ws")
    cache(store, load_model(directory, device="cpu"), corpus)
    before = scan_all(store, str(directory), SITES[0])
    shutil.rmtree(directory)
    build_tiny_model("gpt2", directory, tokenizer, d_model=64)
    with pytest.raises(WorkbenchError) as e:
        cache(store, load_model(directory, device="cpu"), corpus, run="another")
    message = one_line(e)
    assert "width 32" in message and "width 64" in message and SITES[0] in message
    assert len(store.runs()) == 1
    assert all(torch.equal(a, b) for a, b in zip(scan_all(store, str(directory), SITES[0]), before))


def test_changed_settings_of_an_existing_run_are_refused(store, tiny_model, corpus):
    cache(store, tiny_model, corpus, run="r")
    for kwargs, fragment in [({"dtype": "bfloat16"}, "dtype"), ({"sites": SITES[:1]}, "sites"), ({"context": 16}, "context")]:
        with pytest.raises(WorkbenchError, match=fragment) as e:
            cache(store, tiny_model, corpus, run="r", **kwargs)
        assert "--run" in one_line(e)
    assert store.run(tiny_model, SITES).rows == 4 * CTX


def test_an_existing_run_keeps_its_segment_size_and_says_so(store, tiny_model, corpus, capsys):
    cache(store, tiny_model, corpus, run="r", segment_tokens=2 * CTX)
    capsys.readouterr()
    cache(store, tiny_model, corpus, run="r", tokens=8 * CTX, segment_tokens=4 * CTX)
    assert "keeps its segments of 64 tokens" in capsys.readouterr().err
    assert [s.end - s.first for s in store.run(tiny_model, SITES).segments] == [2, 2, 2, 2]
    with pytest.raises(WorkbenchError, match="segment_tokens"):
        cache(store, tiny_model, corpus, run="r", segment_tokens=0)


def test_a_corpus_file_has_no_splits(store, tiny_model, corpus):
    with pytest.raises(WorkbenchError, match="no splits") as e:
        cache(store, tiny_model, corpus, split="heldout")
    one_line(e)
    assert not store.workspace.store_dir.exists()


def test_short_corpus_caches_what_there_is_and_says_so(store, tiny_model, tmp_path, capsys):
    small = write_corpus(tmp_path / "small.txt", n_docs=3)
    available = len(expected_tokens(tiny_model, small, 10_000))
    assert 0 < available < 100
    result = cache(store, tiny_model, small, tokens=100 * CTX)
    assert result.short and result.sequences == available and result.rows == available * CTX and result.complete
    err = capsys.readouterr().err
    assert "only" in err and f"{available * CTX:,} tokens" in err and "cached what there is" in err
    _, _, acts = scan_all(store, tiny_model, SITES[0])
    assert len(acts) == available * CTX
    again = cache(store, tiny_model, small, tokens=100 * CTX)  # the same command again: nothing left to do
    assert again.new_rows == 0 and again.rows == result.rows
    assert again.short and "holds only" in again.message  # still short, and still says so


def test_empty_corpus_is_refused(store, tiny_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(WorkbenchError, match="no complete sequence") as e:
        cache(store, tiny_model, empty)
    one_line(e)
    assert not list(store.workspace.store_dir.glob("*/*/seg-*"))


def _poisoned_model(tmp_path, tokenizer, token: int, value: float):
    """A tiny GPT-2 whose embedding row for `token` is +-`value` (inf, or too large for float16).

    Alternating signs keep the row's mean at zero, so centring the writing weights keeps it."""
    from safetensors.torch import load_file, save_file

    directory = build_tiny_model("gpt2", tmp_path / "poisoned", tokenizer)
    weights = load_file(directory / "model.safetensors")
    key = next(k for k in weights if k.endswith("wte.weight"))
    weights[key][token] = value * (1 - 2 * (torch.arange(weights[key].shape[1]) % 2))
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return load_model(directory, device="cpu")


def test_nan_and_inf_activations_are_refused_naming_site_and_rows(tmp_path, tokenizer, corpus, tiny_model):
    tokens = expected_tokens(tiny_model, corpus, 4)
    token = int(tokens[1, 5])
    first = (tokens == token).nonzero()[0]  # the first row holding the poisoned token
    model = _poisoned_model(tmp_path, tokenizer, token, float("inf"))
    store = ActivationStore(tmp_path / "ws")
    cache(store, tiny_model, corpus, run="healthy")
    with pytest.raises(WorkbenchError) as e:
        cache(store, model, corpus, sites=["hook_embed"], run="poisoned")
    message = one_line(e)
    assert "NaN/inf" in message and "hook_embed" in message
    assert f"(seq {int(first[0])}, pos {int(first[1])})" in message
    assert "of the batch of sequences 0-3" in message  # the count is of that batch: the job stops there
    assert not list(store.workspace.store_dir.glob("*/poisoned/seg-*"))  # nothing half-written
    assert store.run(tiny_model, SITES, "healthy").rows == 4 * CTX


def test_float16_overflow_is_refused_with_a_hint(tmp_path, tokenizer, corpus, tiny_model):
    token = int(expected_tokens(tiny_model, corpus, 1)[0, 3])
    model = _poisoned_model(tmp_path, tokenizer, token, 1e5)  # finite in float32, beyond float16's 65504
    store = ActivationStore(tmp_path / "ws")
    with pytest.raises(WorkbenchError, match="65504") as e:
        cache(store, model, corpus, sites=["hook_embed"], dtype="float16")
    one_line(e)
    assert cache(store, model, corpus, sites=["hook_embed"], dtype="bfloat16").rows == 4 * CTX


def test_reading_what_is_not_there(store, tiny_model, corpus):
    with pytest.raises(WorkbenchError, match="nothing is cached"):
        next(store.batches(tiny_model, SITES[0], 8))
    cache(store, tiny_model, corpus, run="a")
    cache(store, tiny_model, corpus, run="b", tokens=2 * CTX)
    with pytest.raises(WorkbenchError, match="python -m workbench cache") as e:
        next(store.batches(tiny_model, "blocks.0.hook_mlp_out", 8))
    assert "run a" in one_line(e)
    with pytest.raises(WorkbenchError, match="several runs") as e:
        next(store.batches(tiny_model, SITES[0], 8))
    assert len(torch.cat(list(store.batches(tiny_model, SITES[0], 8, run="b")))) == 2 * CTX
    with pytest.raises(WorkbenchError, match="batch_size"):
        next(store.batches(tiny_model, SITES[0], 0, run="a"))
    with pytest.raises(WorkbenchError, match="no rows selected"):
        next(store.batches(tiny_model, SITES[0], 8, run="a", start_row=10**6))
    with pytest.raises(WorkbenchError, match="no rows selected"):  # scan says so too, rather than yield nothing
        next(store.scan(tiny_model, SITES[0], 8, run="a", start_row=10**6))
    # the delivery is checked before anything is read: an integer dtype would truncate the values
    with pytest.raises(WorkbenchError, match="not a floating-point type") as e:
        next(store.batches(tiny_model, SITES[0], 8, run="a", dtype=torch.int64))
    one_line(e)
    for device, says in (("gpu0", "bad device 'gpu0'"), ("cuda:99", "'cuda:99' asked for")):  # cuda:99 on any machine
        for read in (store.batches, store.scan):
            with pytest.raises(WorkbenchError, match=says) as e:
                next(read(tiny_model, SITES[0], 8, run="a", device=device))
            one_line(e)
    with pytest.raises(WorkbenchError, match="not in run"):
        store.tokens(tiny_model, [0, 99], run="a")
    with pytest.raises(WorkbenchError, match="SQL error"):
        store.sql("SELECT nope FROM activations", model=tiny_model, run="a")


def test_a_run_in_an_older_store_format_is_refused_with_what_to_do(store, tiny_model, corpus):
    result = cache(store, tiny_model, corpus, run="old")
    manifest = store.run(tiny_model, SITES, run="old").directory / "run.json"
    raw = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(raw, format=1)))
    for attempt in (lambda: next(store.batches(tiny_model, SITES[0], 8)), lambda: cache(store, tiny_model, corpus, run="old")):
        with pytest.raises(WorkbenchError, match="store format 1") as e:
            attempt()
        assert f"remove {manifest.parent}" in one_line(e)
    assert result.rows == 4 * CTX


def test_a_second_job_on_the_same_run_is_refused(store, tiny_model, corpus):
    with store.workspace.job_lock(job_name(model_name(tiny_model), "words-ctx32")):  # as a running job holds it
        with pytest.raises(WorkbenchError, match="already running") as e:
            cache(store, tiny_model, corpus)
        one_line(e)
    assert cache(store, tiny_model, corpus).rows == 4 * CTX


def test_cli_errors_are_one_line(tmp_path, model_dirs, corpus):
    def run_lines(*argv, workspace=tmp_path / "ws"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["cache", "--workspace", str(workspace), "--model", str(model_dirs["gpt2"]), *argv])
        return code, err.getvalue().strip().splitlines()

    def run(*argv, **kw):
        code, lines = run_lines(*argv, **kw)
        return code, lines[-1] if lines else ""  # the last line: anything a library prints comes first

    code, err = run("--sites", "blocks.0.hook_nope", "--tokens", "100", "--corpus", str(corpus))
    assert code == 1 and err.startswith("error: unknown site")
    code, err = run("--sites", SITES[0], "--tokens", "0", "--corpus", str(corpus))
    assert code == 2 and err.startswith("error: argument --tokens") and "positive" in err
    for bad in (["--tokens", "lots"], ["--tokens", "0.4"], ["--tokens", "2k", "--segment-tokens", "0"], ["--tokens", "2k", "--context", "abc"]):
        code, lines = run_lines("--sites", SITES[0], "--corpus", str(corpus), *bad)  # argparse's usage block: not printed
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: argument") and "--help" in lines[0], lines
    assert "'0.4'" in run_lines("--sites", SITES[0], "--tokens", "0.4")[1][0]  # what was typed, not what it rounds to
    code, err = run("--sites", SITES[0], "--tokens", "100", "--dataset", str(corpus))
    assert code == 1 and "--corpus" in err
    code, err = run("--sites", SITES[0], "--tokens", "100", "--corpus", str(tmp_path / "missing.txt"))
    assert code == 1 and "does not exist" in err
    code, err = run("--sites", SITES[0], "--tokens", "100", "--corpus", str(tmp_path))
    assert code == 1 and "is a directory" in err
    assert not (tmp_path / "ws" / "store").exists()
    code, err = run("--sites", SITES[0], "--tokens", "2k", "--corpus", str(corpus), "--context", "32")
    assert code == 0


def test_sql_over_a_segment_whose_token_table_lost_rows_is_refused(store, tiny_model, corpus):
    """The `activations` view pairs a segment's token table with its site files by position: a token table whose row
    count differs from the site files' is damage, named in one line, never a silently shifted pairing."""
    import duckdb

    cache(store, tiny_model, corpus, tokens=4 * CTX, segment_tokens=2 * CTX)
    seg = store.run(tiny_model, SITES).segments[1]
    with duckdb.connect(str(seg.path / "tokens.duckdb")) as con:
        con.execute("DELETE FROM tokens WHERE seq_id = ? AND pos = 0", [seg.first])
    with pytest.raises(WorkbenchError, match="damaged") as e:
        store.sql("SELECT count(*) FROM activations", model=tiny_model)
    assert seg.path.name in one_line(e) and "tokens.duckdb" in one_line(e) and f"{2 * CTX - 1} rows" in one_line(e)


def test_sql_over_more_segments_than_the_open_file_limit_allows(store, tiny_model, corpus, tmp_path):
    """Each segment's token file stays open while the view is: the soft limit on open files is raised (towards the
    hard limit) when a run needs more, and a hard limit too low gives one line saying what to raise.

    Oracle: the same query in a child process whose soft limit is below the run's segment count, which fails with
    too many open files unless the limit is raised."""
    import subprocess
    import sys
    from pathlib import Path

    segments = 40
    cache(store, tiny_model, corpus, tokens=segments * CTX, segment_tokens=CTX)
    assert len(store.run(tiny_model, SITES).segments) == segments
    code = ("import resource, sys; from workbench.store import ActivationStore; from workbench.model import load_model\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({{soft}}, {{hard}}))\n"
            f"store = ActivationStore({str(store.workspace.root)!r})\n"
            f"n = store.sql('SELECT count(*) AS n FROM activations', model={model_name(tiny_model)!r}).n[0]\n"
            "print(n, resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    root = Path(__file__).resolve().parents[1]

    def child(soft: int, hard: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code.format(soft=soft, hard=hard)], cwd=root, capture_output=True, text=True, timeout=300)

    done = child(segments, 4096)  # fewer files than segments, before anything else the process opens
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(segments * CTX), str(segments + 256)]
    refused = child(segments, segments + 100)
    assert refused.returncode != 0
    last = refused.stderr.strip().splitlines()[-1]
    assert f"has {segments} segments" in last and "ulimit -Hn" in last and str(segments + 256) in last, last


def test_cli_bad_corpus_files_and_workspaces_are_one_line(tmp_path, model_dirs, corpus):
    """Corpus files that are not what they claim, and a workspace the machine will not let the job write, each give
    one line naming the file and what to do, and leave nothing behind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.test_store_faults import file_size_limit

    def run(corpus_path, workspace=tmp_path / "ws"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["cache", "--workspace", str(workspace), "--model", str(model_dirs["gpt2"]), "--sites", SITES[0],
                         "--tokens", "2k", "--context", str(CTX), "--corpus", str(corpus_path)])
        lines = err.getvalue().strip().splitlines()
        return code, lines[-1] if lines else ""

    latin = tmp_path / "latin.txt"
    latin.write_bytes(("plain words\n" * 50 + "caf\u00e9 au lait\n").encode("latin-1"))  # the é: 12 * 50 + 3
    code, err = run(latin)
    assert code == 1 and "not UTF-8 text (byte 603, line 51)" in err and "iconv" in err, err
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("plain words\n" * 50, encoding="utf-16")
    code, err = run(utf16)
    assert code == 1 and "UTF-16 byte-order mark" in err and "iconv -f utf-16" in err, err
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    code, err = run(numbers)
    assert code == 1 and "column 'text' holds int64, not strings" in err, err
    assert not (tmp_path / "ws" / "store").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("not a workspace")
    code, err = run(corpus, workspace=a_file)
    assert code == 1 and "is --workspace a file?" in err and str(a_file) in err, err
    assert a_file.read_text() == "not a workspace"
    with file_size_limit(2):  # the job's lock file takes the process's id: past the limit, as on a full disk
        code, err = run(corpus, workspace=tmp_path / "ws2")
    assert code == 1 and "file-size limit" in err and "ulimit -f" in err, err


def test_cli_keeps_a_user_errors_words_over_the_os_error_beneath_it(monkeypatch, tmp_path):
    """The CLI words a bare OSError from the machine (disk full, ...) itself, but a WorkbenchError raised while
    handling one (the cache job's 'disk full while writing segment ...') already says more: its words are kept."""
    import errno

    import workbench.caching as caching

    def disk_full_then_explained(args):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
        except OSError:
            raise WorkbenchError("disk full while writing segment seg-1: free space and re-run") from None

    def bare_disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    for command, says in ((disk_full_then_explained, "error: disk full while writing segment seg-1"),
                          (bare_disk_full, f"error: No space left on device ({tmp_path / 'x'}): the disk is full")):
        monkeypatch.setattr(caching, "run_cache", command)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["cache", "--workspace", str(tmp_path / "ws"), "--sites", SITES[0], "--tokens", "1k"])
        assert code == 1 and err.getvalue().strip().startswith(says), err.getvalue()
