"""The configuration file: what it accepts, and how clearly it refuses the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python.usage import UsageError

from regproxy import config
from regproxy.config import ConfigError
from regproxy.tap import Options

REPO = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "regproxy.toml"
    path.write_text(text)
    return config.load(path)


def test_example_config_loads() -> None:
    """The shipped example config is valid and serves docker.io (default) and the other registries."""
    loaded = config.load(REPO / "regproxy.example.toml")
    names = [u.name for u in loaded.upstreams]
    assert names[:2] == ["docker.io", "ghcr.io"] and "quay.io" in names
    hub = loaded.upstreams[0]
    assert hub.default and hub.library_prefix and "registry-1.docker.io" in hub.aliases
    assert loaded.default_upstream is hub


def test_full_upstream_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every upstream key is read; the password comes from a file or the environment, never the TOML."""
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "ca.pem").write_text("x")
    monkeypatch.setenv("GHCR_PW", "from-env")
    loaded = load(
        tmp_path,
        """
listen = ["tcp:0"]
public_url = "https://mirror.example.com/"
clients = ["10.0.0.0/8", "::1"]
trusted_proxies = ["127.0.0.1"]
read_size = "1M"
[[upstream]]
name = "docker.io"
default = true
username = "bot"
password_file = "pw"
allow = ["library/*"]
deny = ["library/secret"]
ca = "ca.pem"
[[upstream]]
name = "GHCR.io"
url = "https://ghcr.io"
hosts = ["ghcr.mirror.example.com"]
aliases = ["containers.pkg.github.com"]
username = "me"
password_env = "GHCR_PW"
realm = "https://ghcr.io/token"
redirect_hosts = ["*.githubusercontent.com"]
allow_private_redirects = true
""",
    )
    hub, ghcr = loaded.upstreams
    assert loaded.public_url == "https://mirror.example.com" and loaded.read_size == 1 << 20
    assert hub.url == "https://registry-1.docker.io" and hub.credentials == ("bot", "s3cret")
    assert hub.ca == (str(tmp_path / "ca.pem"),)
    assert ghcr.name == "ghcr.io" and ghcr.credentials == ("me", "from-env") and ghcr.hosts == ("ghcr.mirror.example.com",)
    assert ghcr.realm == "https://ghcr.io/token" and ghcr.allow_private_redirects and not ghcr.library_prefix
    assert "s3cret" not in repr(hub)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "upstream: at least one"),
        ("[[upstream]]\nname = 'ghcr.io'\nurl = 'https://ghcr.io'\nbogus = 1\n", "upstream[0].bogus: unknown key"),
        ("lisen = ['tcp:1']\n[[upstream]]\nname = 'docker.io'\n", "lisen: unknown key"),
        ("[[upstream]]\nname = 'ghcr.io'\n", "upstream[0].url: required"),
        ("[[upstream]]\nname = 'company'\nurl = 'https://c'\n", "upstream[0].name: 'company' is not a registry host name"),
        ("[[upstream]]\nname = 'ghcr.io'\nurl = 'ftp://x'\n", "upstream[0].url: not an http(s) URL"),
        ("[[upstream]]\nname = 'ghcr.io'\nurl = 'https://g'\npassword = 'x'\n", "upstream[0].password: passwords are not read"),
        ("[[upstream]]\nname = 'ghcr.io'\nurl = 'https://g'\nusername = 'x'\n", "upstream[0].username: username and password_file"),
        ("[[upstream]]\nname = 'ghcr.io'\nurl = 'https://g'\ndefault = 'yes'\n", "upstream[0].default: expected true or false"),
        ("[[upstream]]\nname = 'ghcr.io'\nurl = 'https://g'\nallow = [1]\n", "upstream[0].allow: expected a list of strings"),
        ("[[upstream]]\nname = 'ghcr.io'\nurl = 'https://g'\npassword_env = 'NOPE_NOT_SET_X'\n", "the environment variable"),
        ("[[upstream]]\nname = 'ghcr.io'\nurl = 'https://g'\npassword_file = 'missing'\nusername = 'u'\n", "password_file: cannot read"),
        ("[[upstream]]\nname = 'ghcr.io'\nurl = 'https://g'\nca = 'missing.pem'\n", "upstream[0].ca: no such file"),
        ("clients = ['10.0.0.300/8']\n[[upstream]]\nname = 'docker.io'\n", "clients: not an address"),
        ("read_size = 'lots'\n[[upstream]]\nname = 'docker.io'\n", "read_size: not a size"),
        ("workers = 0\n[[upstream]]\nname = 'docker.io'\n", "workers: must be at least 1"),
        ("sendfile_threads = 0\n[[upstream]]\nname = 'docker.io'\n", "sendfile_threads: must be at least 1"),
        (
            "[[upstream]]\nname = 'docker.io'\ndefault = true\n[[upstream]]\nname = 'ghcr.io'\nurl = 'https://g'\ndefault = true\n",
            "only one may be the default",
        ),
        ("[[upstream]]\nname = 'ghcr.io'\nurl = 'https://g'\n[[upstream]]\nname = 'ghcr.io'\nurl = 'https://h'\n", "already selects"),
        (
            "[[upstream]]\nname = 'a.io'\nurl = 'https://a'\nhosts = ['m']\n[[upstream]]\nname = 'b.io'\nurl = 'https://b'\nhosts = ['m']\n",
            "host 'm' already selects",
        ),
        ("[[upstream]\n", "not valid TOML"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    """A mistake in the file stops start-up with a message naming the key and the problem."""
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert message in str(e.value)
    assert str(tmp_path / "regproxy.toml") in str(e.value)


def test_command_line_config_and_overrides(tmp_path: Path) -> None:
    """--config reads the file; server-wide flags override it; upstream flags conflict with it."""
    path = tmp_path / "r.toml"
    path.write_text("listen = ['tcp:1']\nidle_timeout = 5\n[[upstream]]\nname = 'ghcr.io'\nurl = 'https://ghcr.io'\n")
    options = Options()
    options.parseOptions(["--config", str(path), "--listen", "tcp:2", "--response-timeout", "7"])
    loaded = options["config"]
    assert loaded.listen == ("tcp:2",) and loaded.response_timeout == 7 and loaded.idle_timeout == 5
    assert loaded.sendfile_threads == 64
    options = Options()
    options.parseOptions(["--config", str(path), "--sendfile-threads", "8"])
    assert options["config"].sendfile_threads == 8
    with pytest.raises(UsageError, match="sendfile_threads"):
        Options().parseOptions(["--sendfile-threads", "0"])
    with pytest.raises(UsageError, match="--upstream"):
        Options().parseOptions(["--config", str(path), "--upstream", "https://x.example"])
    with pytest.raises(UsageError, match="unknown key"):
        path.write_text("[[upstream]]\nname = 'ghcr.io'\nurl = 'https://ghcr.io'\nnope = 1\n")
        Options().parseOptions(["--config", str(path)])


def test_flags_describe_the_default_upstream() -> None:
    """Without a file the flags give one default upstream named after its URL (Docker Hub: docker.io)."""
    options = Options()
    options.parseOptions(["--upstream", "https://127.0.0.1:5001", "--library-prefix"])
    (upstream,) = options["config"].upstreams
    assert upstream.name == "127.0.0.1:5001" and upstream.default and upstream.library_prefix
    assert "docker.io" in upstream.aliases  # it stands in for Docker Hub for ?ns=docker.io
