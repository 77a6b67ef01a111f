"""cli.py, the machinery every command shares: range-checked flags with one-line errors, a local
directory or a Hub id, and writes that an interruption cannot leave half done."""

import pytest

import cli


def parse_error(parser: cli.Parser, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(argv)
    assert stop.value.code == 2  # argparse's status for a usage error
    return capsys.readouterr().err


def test_range_types_accept_their_range_and_name_it_when_refusing(capsys):
    p = cli.Parser(prog="tool")
    p.add_argument("--n", type=cli.integer(1))
    p.add_argument("--port", type=cli.integer(0, 65535))
    p.add_argument("--g", type=cli.number(0, 1))
    p.add_argument("--lr", type=cli.number(above=0))
    p.add_argument("--beta", type=cli.number(0, below=1))
    args = p.parse_args(["--n", "1", "--port", "65535", "--g", "0.5", "--lr", "1e-4", "--beta", "0"])
    assert (args.n, args.port, args.g, args.lr, args.beta) == (1, 65535, 0.5, 1e-4, 0.0)
    for argv, message in [(["--n", "0"], "argument --n: expected an integer >= 1, got '0'"),
                          (["--n", "two"], "argument --n: expected an integer >= 1, got 'two'"),
                          (["--port", "70000"], "expected an integer from 0 to 65535, got '70000'"),
                          (["--g", "1.5"], "expected a number from 0 to 1, got '1.5'"),
                          (["--g", "nan"], "expected a number from 0 to 1, got 'nan'"),
                          (["--lr", "0"], "expected a number > 0, got '0'"),
                          (["--beta", "1"], "expected a number >= 0 and < 1, got '1'")]:
        err = parse_error(p, argv, capsys)
        assert err.count("\n") == 1 and err.startswith("tool: error: ") and message in err, err


def test_help_appends_defaults_unless_the_help_speaks_of_them():
    p = cli.Parser(prog="tool", formatter_class=cli.HelpFormatter)
    p.add_argument("--fps", type=float, default=30.0, help="control rate")
    p.add_argument("--token", default="secret", help="shared secret (default: $TOKEN)")
    p.add_argument("--out", default=None, help="where to write")
    text = p.format_help()
    assert "control rate (default: 30.0)" in text
    assert "secret" not in text.replace("shared secret", "")  # a default the help already speaks of is not shown
    assert "(default: None)" not in text


def test_resolve_dir_takes_a_local_directory_and_explains_a_missing_one(tmp_path, monkeypatch):
    (tmp_path / "outputs" / "demo_policy").mkdir(parents=True)
    assert cli.resolve_dir(tmp_path / "outputs" / "demo_policy", "policy") == tmp_path / "outputs" / "demo_policy"
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="policy: .*file.json is a file, not a directory"):
        cli.resolve_dir(tmp_path / "file.json", "policy")
    with pytest.raises(ValueError, match=r"dataset: no such local directory: .*nope/a/b .*not a Hub id"):
        cli.resolve_dir(tmp_path / "nope" / "a" / "b", "dataset", error=ValueError)

    calls = []

    def offline(repo_id, **kwargs):
        calls.append((repo_id, kwargs["repo_type"]))
        raise OSError("no network\n  (second line)")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        cli.resolve_dir("outputs/demo_polcy", "policy")  # a typo that has the shape of a Hub id
    message = str(err.value)
    assert "(did you mean outputs/demo_policy?)" in message
    assert "could not provide model 'outputs/demo_polcy' (revision main): OSError: no network (second line)" in message
    assert calls == [("outputs/demo_polcy", "model")]


def test_writing_dir_replaces_the_old_output_only_when_the_new_one_is_complete(tmp_path):
    final = tmp_path / "out"
    with cli.writing_dir(final) as partial:
        (partial / "a.txt").write_text("first")
    assert (final / "a.txt").read_text() == "first" and not partial.exists()

    with pytest.raises(KeyboardInterrupt):
        with cli.writing_dir(final, durable=True) as partial:
            (partial / "a.txt").write_text("half")
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing
    assert (final / "a.txt").read_text() == "first" and not partial.exists()

    with cli.writing_dir(final, partial=tmp_path / ".tmp-out", durable=True) as partial:
        (partial / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_write_text_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    cli.write_text(path, "old")
    original = type(path).write_text

    def full_disk(self, text, *args, **kwargs):
        original(self, text[:2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", full_disk)
    with pytest.raises(OSError):
        cli.write_text(path, "new contents")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json"]


def test_a_live_line_is_rewritten_on_a_terminal_and_plain_in_a_log():
    import io
    import os
    import pty

    log = io.StringIO()
    cli.print_live("step 1", stream=log)
    cli.print_live("step 2", end=True, stream=log)
    assert log.getvalue() == "step 1\nstep 2\n"
    main, secondary = pty.openpty()
    with os.fdopen(secondary, "w") as terminal:
        cli.print_live("step 1", stream=terminal)
        cli.print_live("step 2", end=True, stream=terminal)
    written = b""
    while True:  # a pseudo-terminal hands the bytes over in pieces; EIO once all are read
        try:
            piece = os.read(main, 1024)
        except OSError:
            break
        if not piece:
            break
        written += piece
    os.close(main)
    assert written == b"\rstep 1\x1b[K\rstep 2\x1b[K\r\n"  # the terminal turns the newline into CR LF
