"""Credentials for a secure deployment (tests, trying it out): a CA and a SuperLink
certificate whose subject alternative names are the SuperLink's addresses (127.0.0.1 and
localhost unless --host is given), and ECDSA P-384 SuperNode key pairs in OpenSSH format
(what `--enable-supernode-auth` expects).

    python -m fl_merge.deploy.credentials <dir> [--supernodes 2] [--host 10.0.0.5 --host superlink.lan]

On several hosts, give every address the SuperNodes and `flwr` use to reach the SuperLink
(a node refuses a certificate that does not name the address it dialled); docs/deployment.md
has the openssl equivalent with your own CA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_host(host: str) -> str:
    """`host` if it is an IP address (v4 or v6) or a DNS name (dot-separated labels of
    letters, digits and inner hyphens; a leading "*." wildcard allowed); else ValueError."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host[2:].split(".") if host.startswith("*.") else host.split(".")
    if not host or len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError("--host must be an IP address or a DNS name (e.g. 10.0.0.5, "
                         f"superlink.example.org), got {host!r}")
    return host


def make_certificates(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 30) -> dict[str, Path]:
    """ca.crt, server.pem and server.key in `directory`; the server certificate is signed by
    the CA and valid for `hosts` (IP addresses or DNS names)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fl-merge test CA")).issuer_name(_name("fl-merge test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, paths["key"])
    return paths


def make_supernode_key(path: str | Path) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair: `path` (private, OpenSSH PEM) and `path`.pub (OpenSSH public)."""
    private = Path(path)
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public = private.with_name(private.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_merge.deploy.credentials", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--supernodes", type=int, default=2, help="SuperNode key pairs to make")
    parser.add_argument("--host", action="append", default=None, metavar="ADDRESS",
                        help="an IP address or DNS name the SuperLink is reached at (repeat for several; "
                             "default: 127.0.0.1 and localhost)")
    args = parser.parse_args(argv)
    if args.supernodes < 0:
        parser.error("--supernodes must be >= 0")
    try:
        hosts = tuple(check_host(h) for h in args.host or ("127.0.0.1", "localhost"))
    except ValueError as e:
        parser.error(str(e))
    paths = make_certificates(args.directory, hosts=hosts)
    keys = [make_supernode_key(Path(args.directory) / f"supernode{i}") for i in range(args.supernodes)]
    for p in [*paths.values(), *(k for pair in keys for k in pair)]:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
