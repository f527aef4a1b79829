"""Every subcommand's --help names the environment it reads, its exit codes and one
example, and the example parses. The subcommands and the variables are read from the
parsers and the settings module, so a new command or variable without help fails here."""

from __future__ import annotations

import argparse
import shlex

import pytest

import harness.cli as harness_cli
import proxy.cli as proxy_cli
from harness.secret_scan import ENV_EXTRA_SECRETS_FILE
from proxy import settings


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


CLIS = {"case-proxy": proxy_cli._parser, "case-harness": harness_cli._parser}
COMMANDS = [(cli, name) for cli, make in CLIS.items() for name in subcommands(make())]


def example_argv(help_text: str, cli: str) -> list[str]:
    """The command line under 'example:', without leading VAR=value assignments, the
    program name, or anything after '&&'."""
    block = help_text.split("example:", 1)[1].strip().splitlines()[0]
    words = shlex.split(block.split("&&")[0])
    while words and "=" in words[0] and not words[0].startswith("-"):
        words.pop(0)
    assert words and words[0] == cli, f"example does not run {cli}: {block}"
    return words[1:]


def test_every_subcommand_is_covered() -> None:
    names = {name for _, name in COMMANDS}
    assert {"serve", "check-config", "verify-evidence", "preflight", "run", "verify", "report", "demo"} <= names


@pytest.mark.parametrize(("cli", "name"), COMMANDS)
def test_help_names_environment_exit_codes_and_a_parsing_example(cli: str, name: str) -> None:
    parser = CLIS[cli]()
    text = subcommands(parser)[name].format_help()
    for heading in ("environment", "exit codes:", "example:"):
        assert heading in text, f"{cli} {name} --help lacks '{heading}'"
    assert "\n  0  " in text, f"{cli} {name} --help lists no exit code 0"
    argv = example_argv(text, cli)
    assert argv[0] == name
    parser.parse_args(argv)  # SystemExit (a failed test) if the example does not parse


def test_help_names_every_variable_the_commands_read() -> None:
    env_vars = {v for k, v in vars(settings).items() if k.startswith("ENV_") and isinstance(v, str)}
    env_vars |= set(settings.ENV_SETTINGS.values())  # every server setting's variable
    serve = subcommands(proxy_cli._parser())["serve"].format_help()
    missing = [v for v in env_vars if v.removesuffix("_FILE") not in serve]
    assert missing == [], f"case-proxy serve --help does not name {missing}"
    run = subcommands(harness_cli._parser())["run"].format_help()
    for var in (settings.ENV_DECISION_FILE, settings.ENV_ADMISSION_FILE, settings.ENV_BASE_URL,
                settings.ENV_API_KEY, settings.ENV_CONFIG_FILE, harness_cli.ENV_PROFILE, ENV_EXTRA_SECRETS_FILE):
        assert var in run, f"case-harness run --help does not name {var}"


def test_example_check_can_fail() -> None:
    """Negative control: an example that does not parse is caught."""
    parser = proxy_cli._parser()
    with pytest.raises(SystemExit):
        parser.parse_args(example_argv("example:\n  case-proxy serve --no-such-flag\n", "case-proxy"))
