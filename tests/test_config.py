import re
import tomllib

import attrs
import pytest

from trio_echo.addresses import Address
from trio_echo.config import Config, FaultProfile, LimitsConfig, ListenerConfig
from trio_echo.configfile import config_from_mapping, config_from_toml, config_to_toml, with_overrides
from trio_echo.errors import ConfigError
from trio_echo.events import Flag


def test_defaults_match_the_product_contract() -> None:
    config = Config()
    assert [str(e.address) for e in config.server.listen] == [":40007"]
    assert config.server.backlog == 4096
    assert config.limits.idle_timeout == 300.0
    assert config.limits.send_timeout == 60.0
    assert config.limits.drain_timeout == 20.0
    assert config.limits.linger_timeout == 5.0
    assert config.limits.buffer_size == 65536
    assert config.limits.fd_reserve == 64
    assert config.trace.flags == Flag.ERROR | Flag.INFO
    assert config.admin.listen == "127.0.0.1:40008"
    assert config.supervisor.max_restarts == 5


def test_full_file_parses() -> None:
    config = config_from_toml(
        """
        [server]
        listen = [":0", "[::1]:7", { address = "unix:/tmp/s", name = "local", backlog = 8 }]
        greeting = "hello\\n"
        farewell = "bye\\n"
        [limits]
        idle_timeout = 3
        max_connections = 100
        keepalive = false
        [trace]
        flags = "0x5"
        [supervisor]
        backoff_initial = 1
        backoff_max = 1
        """
    )
    assert config.server.listen[2] == ListenerConfig(Address(path="/tmp/s"), name="local", backlog=8)
    assert config.server.listen[2].label == "local"
    assert config.server.listen[1].label == "[::1]:7"
    assert config.server.farewell == "bye\n"
    assert config.limits.idle_timeout == 3.0
    assert isinstance(config.limits.idle_timeout, float)
    assert config.trace.flags == Flag.ERROR | Flag.CONN


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[limits]\nidle_timeout = -1", "limits.idle_timeout = -1.0: must be >= 0"),
        ("[limits]\nidle_timeout = 'soon'", "limits.idle_timeout = 'soon': expected a number of seconds"),
        ("[limits]\nidle_timeout = inf", "limits.idle_timeout = inf: must be a finite number"),
        ("[limits]\nbuffer_size = 0", "limits.buffer_size = 0: must be > 0"),
        ("[limits]\nbuffer_size = 1.5", "limits.buffer_size = 1.5: expected an integer"),
        ("[limits]\nmax_connections = 0", "limits.max_connections = 0: must be > 0"),
        ("[limits]\nkeepalive = 1", "limits.keepalive = 1: expected true or false"),
        ("[limits]\nallow = ['nope']", "limits.allow[0] = 'nope': is not a CIDR"),
        ("[limits]\ndeny = '10.0.0.0/8'", "limits.deny = '10.0.0.0/8': expected a list"),
        ("[limits]\nbogus = 1", "limits.bogus = 1: unknown key"),
        ("[limits]\nidle_timeout = true", "limits.idle_timeout = True: expected a number"),
        ("[nonsense]\na = 1", "nonsense = {'a': 1}: unknown section"),
        ("limits = 3", "limits = 3: expected a table"),
        ("[server]\nlisten = ['1.2.3.4:70000']", "server.listen[0] = '1.2.3.4:70000':"),
        ("[server]\nlisten = ['nohost']", "server.listen[0] = 'nohost':"),
        ("[server]\nlisten = []", "server.listen = []: needs at least one address"),
        ("[server]\nlisten = [':1', ':1']", "server.listen[1] = ':1': is listed twice"),
        (
            "[server]\nlisten = ['tls://:1']",
            "tls.cert_file = '': a tls:// or https:// listener needs tls.cert_file and tls.key_file",
        ),
        (
            "[server]\nlisten = [{ address = 'udp://:1', proxy_protocol = 'v2', trusted_proxies = ['::1'] }]",
            "server.listen[0].proxy_protocol = 'v2': PROXY headers are for stream listeners",
        ),
        ("[server]\nlisten = [7]", "server.listen[0] = 7: expected an ADDR string or a table"),
        ("[server]\nlisten = [{ name = 'x' }]", "server.listen[0].address = None: a listen table needs"),
        ("[server]\nlisten = [{ address = 7 }]", "server.listen[0].address = 7: expected an ADDR string"),
        ("[server]\nlisten = [{ address = ':1', x = 2 }]", "server.listen[0].x = 2: unknown key"),
        ("[server]\nlisten = [{ address = ':1', backlog = 0 }]", "server.listen[0].backlog = 0: must be > 0"),
        (
            "[server]\nlisten = [{ address = ':1', proxy_protocol = 'v2' }]",
            "server.listen[0].trusted_proxies = []: a PROXY listener needs the proxies' CIDRs",
        ),
        (
            "[server]\nlisten = [{ address = ':1', proxy_protocol = 'yes', trusted_proxies = ['::1'] }]",
            "server.listen[0].proxy_protocol = 'yes': must be one of 'off', 'v1', 'v2', 'any'",
        ),
        (
            "[server]\nlisten = [{ address = ':1', proxy_protocol = 'v1', trusted_proxies = ['lan'] }]",
            "server.listen[0].trusted_proxies[0] = 'lan': is not a CIDR",
        ),
        ("[server]\nbacklog = 70000", "server.backlog = 70000: must be <= 65535"),
        ("[server]\ngreeting = 5", "server.greeting = 5: expected a string"),
        ("[trace]\nflags = 'loud'", "trace.flags = 'loud': unknown trace flag 'loud'"),
        ("[trace]\nflags = 64", "trace.flags = 64: flag value 0x40 out of range"),
        ("[log]\nlevel = 'chatty'", "log.level = 'chatty': must be one of"),
        ("[log]\nformat = 'xml'", "log.format = 'xml': must be one of"),
        ("[admin]\nlisten = 'udp://:1'", "admin.listen = 'udp://:1': the admin port speaks plain HTTP"),
        ("[admin]\nlisten = 'x:y'", "admin.listen = 'x:y':"),
        ("[admin]\nstats_interval = 0", "admin.stats_interval = 0.0: must be > 0"),
        ("[supervisor]\nperiod = 0", "supervisor.period = 0.0: must be > 0"),
        ("[supervisor]\nbackoff_max = 0.01", "supervisor.backoff_max = 0.01: must be >= backoff_initial"),
        ("[tls]\nmin_version = '1.0'", "tls.min_version = '1.0': must be one of"),
        ("[limits\n", "invalid TOML"),
        # near misses name the key that was meant; far misses list the known ones
        ("[limits]\nidle_timout = 1", "limits.idle_timout = 1: unknown key; did you mean idle_timeout?"),
        ("[limit]\nidle_timeout = 1", "limit = {'idle_timeout': 1}: unknown section; did you mean limits?"),
        (
            "[server]\nlisten = [{ address = ':1', proxy_protcol = 'v1' }]",
            "server.listen[0].proxy_protcol = 'v1': unknown key; did you mean proxy_protocol?",
        ),
        ("[limits]\nzzz = 1", "limits.zzz = 1: unknown key (known: max_connections, "),
        # whatever the file holds: one line, never another exception
        ("[server]\nlisten = " + "[" * 600 + "]" * 600, "invalid TOML: arrays or tables nested too deeply"),
        ("[limits]\nallow = " + "[" * 3000 + "]" * 3000, "invalid TOML: arrays or tables nested too deeply"),
        ("x = " + "{a=" * 600 + "1" + "}" * 600, "invalid TOML: arrays or tables nested too deeply"),
        ("[server]\nlisten = " + "[" * 50 + "]" * 50, "server.listen[0] = [[[...]]]: expected an ADDR"),
        ("x = " + "{a=" * 50 + "1" + "}" * 50, "x = {'a': {'a': {...}}}: unknown section"),
        ("[limits]\nmax_connections = " + "9" * 5000, "invalid TOML: Exceeds the limit"),
        ("[limits]\nmax_connections = " + "9" * 30, "limits.max_connections = 999"),
        ("[limits]\nidle_timeout = nan", "limits.idle_timeout = nan: must be a finite number"),
        ("[limits]\nsocket_buffer = 4294967296", "limits.socket_buffer = 4294967296: must be <= 2147483647"),
        ("[limits]\ntls_handshake_timeout = 0", "limits.tls_handshake_timeout = 0.0: must be > 0"),
        ("[server]\ngreeting = ['" + "x" * 5000 + "']", "server.greeting = ['xxxxxxxx"),
        ("\x00\x01\x02", "invalid TOML"),
        ("[server]\nworkers = 0", 'server.workers = 0: expected an integer >= 1 or "auto"'),
        ("[server]\nworkers = 'many'", "server.workers = 'many': expected an integer or 'auto'"),
        ("[server]\nworkers = true", "server.workers = True: expected an integer"),
        ("[server]\nworkers = 2.5", "server.workers = 2.5: expected an integer"),
        ("[server]\nworkers = 5000", "server.workers = 5000: at most 1024"),
    ],
)
def test_every_error_names_key_and_value(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        config_from_toml(toml)
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 800  # a value is quoted shortened, not in full


def test_construction_validates_too() -> None:
    with pytest.raises(ConfigError, match="linger_timeout"):
        LimitsConfig(linger_timeout=-1)


def test_effective_toml_round_trips() -> None:
    config = config_from_toml(
        '[server]\nlisten = [":0", { address = "unix:/tmp/x", name = "u" },'
        ' { address = ":2", proxy_protocol = "v2", trusted_proxies = ["10.0.0.0/8", "::1"] }]\n'
        'greeting = "a\\"b\\n\\u0001"\n'
        "[trace]\nflags = 5\n[limits]\nfd_reserve = 3"
    )
    text = config_to_toml(config, max_connections=1234)
    data = tomllib.loads(text)
    assert data["limits"]["max_connections"] == 1234
    assert data["trace"]["flags"] == "error,conn"
    again = config_from_mapping(data)
    assert again == attrs.evolve(config, limits=attrs.evolve(config.limits, max_connections=1234))


def test_every_key_is_printed() -> None:
    data = tomllib.loads(config_to_toml(Config(), max_connections=10))
    for section in ("server", "limits", "trace", "log", "admin", "supervisor", "tls"):
        fields = attrs.fields(type(getattr(Config(), section)))
        assert set(data[section]) == {f.name for f in fields}


def test_shipped_example_config_is_valid_and_complete() -> None:
    with open("configs/trio-echo.toml", encoding="utf-8") as file:
        text = file.read()
    assert set(config_from_toml(text).faults) == {"example"}
    for section in ("server", "limits", "trace", "log", "admin", "supervisor", "tls"):
        for field in attrs.fields(type(getattr(Config(), section))):
            assert re.search(rf"^#? ?{field.name} = ", text, re.M), f"{section}.{field.name} undocumented"
    example = text[text.index("[faults.example]") :]
    for field in attrs.fields(FaultProfile):
        assert re.search(rf"^{field.name} = ", example, re.M), f"faults.{field.name} undocumented"
    for field in attrs.fields(ListenerConfig):
        assert f" {field.name} " in text or f"{field.name} =" in text, f"listen entry key {field.name}"


@pytest.mark.parametrize(
    ("nofile", "configured", "reserve", "expected"),
    [
        (20000, None, 64, 19936),
        (20000, 100, 64, 100),
        (20000, 50000, 64, 19936),
        (None, None, 64, 4096),
        (None, 10, 64, 10),
        (10, None, 64, 1),
    ],
)
def test_effective_max_connections(
    nofile: int | None, configured: int | None, reserve: int, expected: int
) -> None:
    config = Config(limits=LimitsConfig(max_connections=configured, fd_reserve=reserve))
    assert config.effective_max_connections(nofile) == expected


@pytest.mark.parametrize(
    ("text", "value"), [("workers = 1", 1), ("workers = 8", 8), ('workers = "auto"', "auto")]
)
def test_workers_setting(text: str, value: object) -> None:
    config = config_from_toml(f"[server]\n{text}")
    assert config.server.workers == value
    assert config_from_toml(config_to_toml(config)).server.workers == value
    assert with_overrides(Config(), workers=str(value)).server.workers == value


def test_workers_need_so_reuseport(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.delattr(socket, "SO_REUSEPORT")  # as on Windows
    with pytest.raises(ConfigError, match=r"server\.workers = 2: worker processes need SO_REUSEPORT"):
        config_from_toml("[server]\nworkers = 2")
    assert config_from_toml("[server]\nworkers = 1").server.workers == 1


def test_cli_overrides() -> None:
    config = with_overrides(Config(), listen=["127.0.0.1:1", "unix:/tmp/s"], admin="off")
    assert [str(e.address) for e in config.server.listen] == ["127.0.0.1:1", "unix:/tmp/s"]
    assert config.admin.listen == ""
    assert with_overrides(config).server.listen == config.server.listen
    assert with_overrides(Config(), admin="127.0.0.1:0").admin.listen == "127.0.0.1:0"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"listen": ["nope"]}, "--listen = 'nope'"),
        ({"listen": [":1", ":1"]}, "--listen = ':1': is listed twice"),
        ({"admin": "x"}, "--admin = 'x'"),
        ({"workers": "0"}, "--workers = '0': expected an integer >= 1"),
        ({"workers": "lots"}, "--workers = 'lots'"),
    ],
)
def test_cli_override_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        with_overrides(Config(), **kwargs)  # type: ignore[arg-type]
