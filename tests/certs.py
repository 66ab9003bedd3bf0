"""Certificates for tests: a CA of the test's own and a server certificate signed by it (openssl command line)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_certificates(folder: Path, san: str = "IP:127.0.0.1") -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for ``san`` (an openssl subjectAltName value) signed by it."""
    ca_key, ca, key, request, cert = (
        folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    )
    extensions = folder / "san.cnf"
    extensions.write_text(f"subjectAltName={san}\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request, "-subj", "/CN=test-server"],
        ["x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", extensions],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, cert, key
