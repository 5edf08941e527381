"""The CLI run in-process, twice, with redirected streams: logging afterwards still works."""

from __future__ import annotations

import contextlib
import io
import logging

from aerosynth.flows.cli import main


def test_cli_leaves_no_log_handler_on_a_closed_stream(tmp_path, capsys):
    # ``adapt --config`` imports Prefect, which binds its console handler to the sys.stderr of that moment
    for _ in range(2):
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            assert main(["adapt", "--config", str(tmp_path / "missing.yaml")]) == 2
        assert "missing.yaml" in err.getvalue()
        err.close()
        out.close()
    capsys.readouterr()
    logging.getLogger("prefect.aerosynth_test").warning("still logging")
    logging.getLogger("aerosynth_test").warning("root handler too")
    captured = capsys.readouterr().err
    assert "Logging error" not in captured and "closed file" not in captured, captured
    assert "still logging" in captured and "root handler too" in captured, captured
