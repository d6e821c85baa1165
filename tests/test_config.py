"""Tests for pydio_ws.config: the key table, precedence, validation and the etc/ sample."""

import ipaddress
import os
import shutil
import tempfile

from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage
from twisted.trial import unittest

from pydio_ws.config import (KEYS, ConfigError, load_config, parse_bool, parse_port, parse_size,
                             sample_ini)
from pydio_ws.service import Options

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO_ROOT, "etc", "pydio-ws.ini")

LOOPBACK_V4 = ipaddress.ip_network("127.0.0.1/32")


class _TempFiles:
    """Mixin: write files into a temporary directory removed after the test."""

    def temp_dir(self) -> str:
        path = tempfile.mkdtemp(prefix="pydio-ws-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def write(self, text: str, name: str = "pydio-ws.ini") -> str:
        path = os.path.join(self.temp_dir(), name)
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(text)
        return path


class DefaultsTests(unittest.TestCase):
    """What a server with no configuration at all runs on."""

    def test_defaults_are_the_issue_ini(self):
        """With no file, environment or overrides every key of the issue's INI has its default."""
        config = load_config(environ={})
        self.assertEqual(config.source, None)
        self.assertEqual(
            (config.public.host, config.public.port, config.public.path, config.public.ssl,
             config.public.ssl_cert, config.public.ssl_key, config.public.allowed_origins),
            ("localhost", 8090, "/public", False, "", "", ()))
        self.assertEqual(
            (config.private.host, config.private.port, config.private.path, config.private.key,
             config.private.key_file),
            ("localhost", 8090, "/private", "", ""))
        self.assertIn(LOOPBACK_V4, config.private.authorized_hosts)
        self.assertEqual(
            (config.auth.mode, config.auth.pydio_url, config.auth.verify_ssl, config.auth.ca_file),
            ("token", "", True, ""))
        self.assertEqual(config.broker.url, "memory://")

    def test_default_body_limit_is_one_mebibyte(self):
        """private.max_body_size defaults to 1 MiB."""
        self.assertEqual(load_config(environ={}).private.max_body_size, 1024 * 1024)

    def test_defaults_share_one_listener(self):
        """On defaults public and private share localhost:8090 on two different paths."""
        config = load_config(environ={})
        self.assertTrue(config.shared_listener)
        self.assertFalse(config.single_path)

    def test_config_is_read_only(self):
        """A loaded Config refuses assignment to its values."""
        config = load_config(environ={})
        with self.assertRaises(AttributeError):
            config.public.port = 1


class PrecedenceTests(_TempFiles, unittest.TestCase):
    """defaults < file < environment < overrides, one key set at every level."""

    def test_file_beats_default(self):
        """A value in the INI file replaces the default."""
        path = self.write("[public]\nport = 8001\n")
        self.assertEqual(load_config(path, environ={}).public.port, 8001)

    def test_environment_beats_file(self):
        """PYDIO_WS_PUBLIC_PORT replaces the INI file's value."""
        path = self.write("[public]\nport = 8001\n")
        self.assertEqual(load_config(path, environ={"PYDIO_WS_PUBLIC_PORT": "8002"}).public.port, 8002)

    def test_overrides_beat_environment(self):
        """A command-line override replaces the environment and the file."""
        path = self.write("[public]\nport = 8001\n")
        config = load_config(path, environ={"PYDIO_WS_PUBLIC_PORT": "8002"},
                             overrides={("public", "port"): "8003"})
        self.assertEqual(config.public.port, 8003)

    def test_private_key_env_var_name(self):
        """The private key is read from the environment variable PYDIO_WS_PRIVATE_KEY."""
        key = next(k for k in KEYS if (k.section, k.name) == ("private", "key"))
        self.assertEqual(key.env_var, "PYDIO_WS_PRIVATE_KEY")
        self.assertEqual(load_config(environ={"PYDIO_WS_PRIVATE_KEY": "s3cret"}).private.key, "s3cret")

    def test_error_names_the_level_that_set_the_value(self):
        """A bad value from the environment is reported with the variable's name."""
        with self.assertRaises(ConfigError) as caught:
            load_config(environ={"PYDIO_WS_PUBLIC_PORT": "abc"})
        self.assertIn("PYDIO_WS_PUBLIC_PORT", str(caught.exception))

    def test_inline_comment_is_not_part_of_the_value(self):
        """A `; comment` after a value, as in the issue's INI, is ignored."""
        path = self.write("[auth]\nmode = token         ; token now\n")
        self.assertEqual(load_config(path, environ={}).auth.mode, "token")


class InvalidValueTests(_TempFiles, unittest.TestCase):
    """Each invalid setting stops with one ConfigError line naming the key."""

    def assertRefused(self, expected: str, path=None, **overrides):
        raw = {tuple(name.split("_", 1)): value for name, value in overrides.items()}
        with self.assertRaises(ConfigError) as caught:
            load_config(path, environ={}, overrides=raw)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn(expected, message)
        return message

    def test_port_out_of_range(self):
        """public.port = 70000 is refused naming public.port."""
        message = self.assertRefused("public.port", public_port="70000")
        self.assertIn("70000", message)

    def test_port_not_a_number(self):
        """private.port = abc is refused naming private.port."""
        self.assertRefused("private.port", private_port="abc")

    def test_path_without_leading_slash(self):
        """public.path without a leading "/" is refused naming public.path."""
        self.assertRefused("public.path", public_path="public")

    def test_unknown_key(self):
        """An unknown key in a known section is refused with its name."""
        self.assertRefused("'colour'", self.write("[public]\ncolour = blue\n"))

    def test_unknown_section(self):
        """An unknown section is refused with its name."""
        self.assertRefused("[extra]", self.write("[extra]\nport = 1\n"))

    def test_unreadable_key_file(self):
        """A key_file that cannot be read is refused naming private.key_file."""
        missing = os.path.join(self.temp_dir(), "missing.key")
        self.assertRefused("private.key_file", private_key_file=missing)

    def test_bad_bool(self):
        """auth.verify_ssl = maybe is refused naming auth.verify_ssl."""
        self.assertRefused("auth.verify_ssl", auth_verify_ssl="maybe")

    def test_bad_origin(self):
        """An allowed origin that is not scheme://host[:port] is refused naming public.allowed_origins."""
        self.assertRefused("public.allowed_origins", public_allowed_origins="https://pydio.example/path")
        self.assertRefused("public.allowed_origins", public_allowed_origins="ftp://pydio.example")

    def test_unresolvable_authorized_host(self):
        """An authorized host name that does not resolve is refused naming private.authorized_hosts."""
        message = self.assertRefused("private.authorized_hosts",
                                     private_authorized_hosts="127.0.0.1, no-such-host.invalid")
        self.assertIn("no-such-host.invalid", message)

    def test_pydio_mode_needs_pydio_url(self):
        """auth.mode = pydio without auth.pydio_url is refused naming auth.pydio_url."""
        self.assertRefused("auth.pydio_url", auth_mode="pydio")

    def test_bad_auth_mode(self):
        """An auth.mode other than token or pydio is refused naming auth.mode."""
        self.assertRefused("auth.mode", auth_mode="ldap")

    def test_unsupported_broker(self):
        """A broker.url other than memory://, redis:// or rediss:// is refused naming broker.url."""
        self.assertRefused("broker.url", broker_url="amqp://localhost")

    def test_workers_need_redis(self):
        """More than one worker with the memory broker is refused naming server.workers."""
        self.assertRefused("server.workers", server_workers="2")

    def test_not_an_ini_file(self):
        """A file that is not INI is refused with one line naming the file."""
        path = self.write("just some text\nwithout sections\n")
        self.assertRefused(path, path)

    def test_missing_config_file(self):
        """A config file that does not exist is refused with one line naming the file."""
        path = os.path.join(self.temp_dir(), "absent.ini")
        self.assertRefused(path, path)


class AuthorizedHostsTests(unittest.TestCase):
    """authorized_hosts entries become ip networks."""

    def test_cidr_ip_and_hostname_parse_into_networks(self):
        """A CIDR, a bare IPv4, a bare IPv6 and a host name all become ip networks."""
        config = load_config(environ={}, overrides={
            ("private", "authorized_hosts"): "10.0.0.0/8, 192.168.1.5, ::1, localhost"})
        networks = config.private.authorized_hosts
        self.assertIn(ipaddress.ip_network("10.0.0.0/8"), networks)
        self.assertIn(ipaddress.ip_network("192.168.1.5/32"), networks)
        self.assertIn(ipaddress.ip_network("::1/128"), networks)
        self.assertIn(LOOPBACK_V4, networks)
        self.assertTrue(all(isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
                            for n in networks))

    def test_host_bits_in_cidr_are_accepted(self):
        """A CIDR written with host bits set names its network."""
        config = load_config(environ={}, overrides={("private", "authorized_hosts"): "10.1.2.3/8"})
        self.assertEqual(config.private.authorized_hosts, (ipaddress.ip_network("10.0.0.0/8"),))


class ListenerLayoutTests(unittest.TestCase):
    """shared_listener and single_path follow host:port and paths."""

    def layout(self, **overrides):
        raw = {tuple(name.split("_", 1)): value for name, value in overrides.items()}
        config = load_config(environ={}, overrides=raw)
        return config.shared_listener, config.single_path

    def test_different_ports_use_two_listeners(self):
        """Different ports mean two listeners."""
        self.assertEqual(self.layout(private_port="8091"), (False, False))

    def test_different_hosts_use_two_listeners(self):
        """Different hosts on the same port mean two listeners."""
        self.assertEqual(self.layout(public_host="0.0.0.0"), (False, False))

    def test_host_comparison_ignores_case(self):
        """LOCALHOST and localhost on one port are the same listener."""
        self.assertEqual(self.layout(public_host="LOCALHOST"), (True, False))

    def test_equal_paths_on_shared_listener_is_single_path(self):
        """Equal paths on one shared listener is Pydio 6's single-path setup."""
        self.assertEqual(self.layout(public_path="/ws", private_path="/ws"), (True, True))

    def test_equal_paths_on_two_listeners_is_not_single_path(self):
        """Equal paths on two listeners are two separate endpoints."""
        self.assertEqual(self.layout(public_path="/ws", private_path="/ws", private_port="8091"),
                         (False, False))


class SampleTests(unittest.TestCase):
    """etc/pydio-ws.ini is generated from the key table."""

    def test_sample_file_equals_generated_sample(self):
        """etc/pydio-ws.ini is exactly sample_ini()."""
        with open(SAMPLE, encoding="utf-8") as stream:
            self.assertEqual(stream.read(), sample_ini())

    def test_every_key_appears_in_its_section(self):
        """Every key of KEYS appears, in its own section, of the generated sample."""
        section = None
        seen = set()
        for line in sample_ini().splitlines():
            if line.startswith("["):
                section = line.strip("[]")
            elif line and not line.startswith("#"):
                seen.add((section, line.lstrip(";").split("=")[0].strip()))
        self.assertEqual(seen, {(key.section, key.name) for key in KEYS})

    def test_sample_loads(self):
        """load_config accepts the generated sample and gives the defaults."""
        tmp = tempfile.mkdtemp(prefix="pydio-ws-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "sample.ini")
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(sample_ini())
        config = load_config(path, environ={})
        self.assertEqual((config.public.port, config.private.path), (8090, "/private"))

    def test_sample_file_loads(self):
        """load_config accepts etc/pydio-ws.ini."""
        self.assertEqual(load_config(SAMPLE, environ={}).source, SAMPLE)

    def test_sample_has_no_secret_value(self):
        """Secret keys appear commented out and empty in the sample."""
        lines = sample_ini().splitlines()
        for key in (k for k in KEYS if k.secret):
            self.assertIn(f";{key.name} =", lines)


class OptionTests(unittest.TestCase):
    """The key table's long options."""

    def test_secret_keys_have_no_command_line_option(self):
        """A Key with secret=True has no long option in service.Options."""
        names = {parameter[0] for parameter in Options.optParameters}
        secrets = [key for key in KEYS if key.secret]
        self.assertTrue(secrets)
        for key in secrets:
            self.assertNotIn(key.option, names)
            with self.assertRaises(usage.UsageError):
                Options().parseOptions([f"--{key.option}", "s3cret"])

    def test_every_other_key_has_a_long_option(self):
        """Every non-secret key has --section-key in service.Options."""
        names = {parameter[0] for parameter in Options.optParameters}
        for key in KEYS:
            if not key.secret:
                self.assertIn(key.option, names)


class ParserPropertyTests(unittest.TestCase):
    """Value parsers on arbitrary text: a valid value or ValueError, nothing else."""

    @given(st.text())
    def test_parse_size_returns_positive_int_or_value_error(self, raw):
        """parse_size returns an int of at least 1 or raises ValueError."""
        try:
            value = parse_size(raw)
        except ValueError:
            return
        self.assertIsInstance(value, int)
        self.assertGreaterEqual(value, 1)

    @given(st.text() | st.integers(min_value=-10, max_value=70000).map(str))
    def test_parse_port_returns_port_or_value_error(self, raw):
        """parse_port returns an int in 0-65535 or raises ValueError."""
        try:
            value = parse_port(raw)
        except ValueError:
            return
        self.assertIsInstance(value, int)
        self.assertTrue(0 <= value <= 65535)

    @given(st.text() | st.sampled_from(["true", " On ", "NO", "0", "1", "yes", "off", "False"]))
    def test_parse_bool_returns_bool_or_value_error(self, raw):
        """parse_bool returns a bool or raises ValueError."""
        try:
            value = parse_bool(raw)
        except ValueError:
            return
        self.assertIsInstance(value, bool)

    def test_size_units(self):
        """Sizes accept bytes and k/KiB/M/MiB/G/GiB units."""
        self.assertEqual([parse_size(s) for s in ("65536", "64k", "64KiB", "1M", "1MiB", "1 GiB")],
                         [65536, 65536, 65536, 1048576, 1048576, 1024 ** 3])
