"""`python -m fl_merge.deploy.credentials --host`: the SuperLink certificate names the addresses the
nodes dial (several hosts: the SuperLink's subnet IP, a DNS name). Checked with openssl's
own verifier, an implementation independent of the code that wrote the certificate."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from fl_merge.deploy.credentials import check_host, main

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def _verifies(creds, flag: str, name: str) -> bool:
    proc = subprocess.run(["openssl", "verify", "-CAfile", str(creds / "ca.crt"), flag, name,
                           str(creds / "server.pem")], capture_output=True, text=True, timeout=60,
                          check=False)
    return proc.returncode == 0 and "OK" in proc.stdout


@needs_openssl
def test_the_certificate_names_exactly_the_hosts_given(tmp_path, capsys):
    assert main([str(tmp_path), "--supernodes", "1", "--host", "10.213.0.1",
                 "--host", "superlink.example.org"]) == 0
    assert _verifies(tmp_path, "-verify_ip", "10.213.0.1")
    assert _verifies(tmp_path, "-verify_hostname", "superlink.example.org")
    assert not _verifies(tmp_path, "-verify_ip", "127.0.0.1")  # not given, so not valid for it
    assert not _verifies(tmp_path, "-verify_ip", "10.213.0.2")
    assert (tmp_path / "supernode0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


@needs_openssl
def test_without_host_the_certificate_is_for_this_machine(tmp_path):
    assert main([str(tmp_path), "--supernodes", "0"]) == 0
    assert _verifies(tmp_path, "-verify_ip", "127.0.0.1")
    assert _verifies(tmp_path, "-verify_hostname", "localhost")
    assert not (tmp_path / "supernode0").exists()


def test_host_names_and_addresses_are_checked():
    assert check_host("10.0.0.5") == "10.0.0.5"
    assert check_host("fd00::1") == "fd00::1"
    assert check_host("superlink-1.example.org") == "superlink-1.example.org"
    assert check_host("*.example.org") == "*.example.org"
    for bad in ("", "10.0.0.5:9093", "https://superlink", "super link", "-bad.example", "a..b"):
        with pytest.raises(ValueError, match=r"^--host must be an IP address or a DNS name .* got "):
            check_host(bad)


def test_a_bad_host_is_one_error_line_and_nothing_written(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fl_merge.deploy.credentials", str(tmp_path / "creds"), "--host",
                           "10.0.0.5:9093"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "python -m fl_merge.deploy.credentials: error: --host must be an IP address or a DNS name "
        "(e.g. 10.0.0.5, superlink.example.org), got '10.0.0.5:9093'")
    assert not (tmp_path / "creds").exists()
