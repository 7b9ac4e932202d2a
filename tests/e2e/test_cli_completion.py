"""``thinblock completion bash|zsh|fish``: the script each shell loads, run in that shell.

The script calls ``thinblock`` back with argcomplete's environment; the answers come from the
same parser that runs the commands, so a new command or option completes without more work."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import THINBLOCK_SCRIPT

# The venv's thinblock first on PATH: the scripts call `thinblock` by name, as a user's shell does.
ENV = {**os.environ, "PATH": f"{Path(THINBLOCK_SCRIPT).parent}:{os.environ.get('PATH', '')}"}


def _script(shell: str, tmp_path: Path) -> Path:
    out = subprocess.run([THINBLOCK_SCRIPT, "completion", shell], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    path = tmp_path / f"thinblock.{shell}"
    path.write_text(out.stdout)
    return path


def _bash_complete(script: Path, line: str) -> list[str]:
    """What bash's completion offers for ``line`` (the cursor at its end), through the function
    the script registered with ``complete -F``."""
    program = f"""
source {script}
complete -p thinblock >/dev/null || exit 7
COMP_LINE={line!r}
COMP_POINT=${{#COMP_LINE}}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *' ' ]] && COMP_WORDS+=('')
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
func=$(complete -p thinblock | sed -E 's/.*-F ([^ ]+) .*/\\1/')
"$func" thinblock "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    return sorted(word.strip() for word in out.stdout.splitlines() if word.strip())


def test_bash_completes_commands_verbs_options_and_choices(tmp_path: Path) -> None:
    script = _script("bash", tmp_path)
    commands = _bash_complete(script, "thinblock ")
    assert {"vv", "pool", "pd", "status", "completion", "serve", "check"} <= set(commands)
    assert _bash_complete(script, "thinblock po") == ["pool"]
    assert {"create", "list", "show", "grow", "delete", "import"} <= set(
        _bash_complete(script, "thinblock vv ")
    )
    assert _bash_complete(script, "thinblock vv cr") == ["create"]
    assert "--alloc-limit" in _bash_complete(script, "thinblock vv create db1 --al")
    words = [w for w in _bash_complete(script, "thinblock completion ") if not w.startswith("-")]
    assert words == ["bash", "fish", "zsh"]
    assert _bash_complete(script, "thinblock pool create gold --raid ") == ["0", "1", "5"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed (Makefile APT_PKGS has it)")
def test_fish_completes_through_its_script(tmp_path: Path) -> None:
    script = _script("fish", tmp_path)
    out = subprocess.run(
        [
            "fish",
            "--no-config",
            "-c",
            f"source {script}; complete -C 'thinblock vv cr'; complete -C 'thinblock po'",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    offered = [line.split("\t")[0] for line in out.stdout.splitlines()]
    assert offered == ["create", "pool"], out.stdout


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (Makefile APT_PKGS has it)")
def test_zsh_registers_the_completion_function(tmp_path: Path) -> None:
    """zsh runs completion functions only inside its line editor; what can be checked without a
    terminal is that the script loads into the completion system and registers its function for
    thinblock, and that the function answers as it will when zsh calls it (words and cursor)."""
    script = _script("zsh", tmp_path)
    program = f"""
autoload -U compinit && compinit -u -D
source {script}
print -r -- "${{_comps[thinblock]}}"
"""
    out = subprocess.run(["zsh", "-f", "-c", program], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    function = out.stdout.strip()
    assert function, "no completion function registered for thinblock"
    # The function's call back to thinblock, with the environment it sets for zsh (the answer
    # goes to fd 8, as the script's __python_argcomplete_run arranges).
    env = {**ENV, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_SHELL": "zsh", "COMP_LINE": "thinblock vv cr",
           "COMP_POINT": str(len("thinblock vv cr")), "_ARGCOMPLETE_SUPPRESS_SPACE": "1"}  # fmt: skip
    answer = subprocess.run(
        ["zsh", "-f", "-c", "thinblock 8>&1 9>&2 1>/dev/null 2>&1 </dev/null"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.split("\v") == ["create:create a thin volume"]  # with its help for zsh
