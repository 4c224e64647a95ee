"""The CLI's exit: codes, flushed output and atexit handlers survive skipping the interpreter teardown."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_main(argv: list[str], prelude: str = "", tmp_path=None) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        {prelude}
        sys.argv = ["deltawise", *{argv!r}]
        from deltawise.cli import main
        main()
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_success_flushes_output_and_runs_atexit_handlers(tmp_path):
    marker = tmp_path / "atexit-ran"
    proc = run_main(["methods"], f"import atexit; atexit.register(lambda: open({str(marker)!r}, 'w').write('ok'))")
    assert proc.returncode == 0, proc.stderr
    assert "task_arithmetic" in proc.stdout and "ties" in proc.stdout  # the whole table reached the pipe
    assert marker.read_text() == "ok"


def test_error_and_usage_exit_codes(tmp_path):
    missing = run_main(["verify", str(tmp_path / "nowhere")])
    assert missing.returncode == 1 and "error:" in missing.stderr
    usage = run_main(["merge", "--no-such-option"])
    assert usage.returncode == 2 and "No such option" in usage.stderr


def test_a_running_thread_is_waited_for(tmp_path):
    marker = tmp_path / "thread-done"
    code = textwrap.dedent(f"""
        import sys, threading, time
        from deltawise import cli
        exiting = threading.Event()
        real_exit = cli._exit
        def exit_after_signal(code):
            exiting.set()  # the thread below is still working when the command ends
            real_exit(code)
        cli._exit = exit_after_signal
        def late():
            exiting.wait(60)
            time.sleep(0.3)
            open({str(marker)!r}, "w").write("done")
        threading.Thread(target=late).start()
        sys.argv = ["deltawise", "methods"]
        cli.main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "done"
