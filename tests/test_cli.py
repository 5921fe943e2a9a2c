"""The `llmkit` command as a user meets it: version, one-line errors, closed pipes, logging."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

from llmkit import cli


def run(*args, env=None, stdin=None):
    return subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"llmkit {importlib.metadata.version('llmkit')}"


def test_user_error_is_one_line_and_exit_2(tmp_path):
    out = run("models", "info", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert out.stderr.startswith("llmkit models: error:") and "config.json" in out.stderr


def test_debug_env_shows_the_traceback(tmp_path):
    out = run("models", "info", str(tmp_path), env={"LLMKIT_DEBUG": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_unexpected_error_names_its_type(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("kernel said no\nsecond line")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["info"].set_defaults(handler=boom)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("llmkit info: error: RuntimeError: kernel said no second line "
                           "(LLMKIT_DEBUG=1 shows the traceback)")


def test_closed_pipe_is_quiet():
    # `llmkit models list | head -1`: the reader goes away; no BrokenPipeError traceback.
    proc = subprocess.Popen(f"{sys.executable} -m llmkit models list | head -1", shell=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert out.startswith("family") and "Traceback" not in err and "BrokenPipe" not in err


def test_logging_goes_to_stderr_and_quiet_silences_it(capsys):
    import logging

    from llmkit.utils import get_logger

    parser = cli.build_parser()
    for flags, shown in (([], True), (["-q"], False)):
        args = parser.parse_args([*flags, "info"])
        cli._configure_logging(args)
        get_logger("llmkit.test").info("a note")
        assert ("a note" in capsys.readouterr().err) is shown
        logging.getLogger("llmkit").handlers.clear()


@pytest.mark.parametrize("argv", [["demo", "--section", "nope"], ["bench", "nope"]])
def test_unknown_names_are_user_errors(argv, capsys):
    assert cli.main(argv) == 2
    assert "unknown" in capsys.readouterr().err


def test_progress_bars_are_off_without_a_terminal(capsys):
    from llmkit.utils import progress_bar

    for _ in progress_bar(range(3), desc="x"):  # pytest's captured stderr is not a TTY
        pass
    assert capsys.readouterr().err == ""
    os.environ["LLMKIT_PROGRESS"] = "1"
    try:
        for _ in progress_bar(range(3), desc="forced"):
            pass
    finally:
        del os.environ["LLMKIT_PROGRESS"]
    assert "forced" in capsys.readouterr().err
