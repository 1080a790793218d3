"""Mutual TLS for every internal port of a local SeaweedFS: a private CA, one certificate per
component, and the ``[grpc*]`` and ``[https*]`` sections of ``security.toml`` that name them.

Without it, anyone on the machine can reach the storage with no credentials: the filer's
gRPC port (filer port + 10000) takes ``weed shell`` (``fs.rm`` deletes an object that S3
then no longer has), and the master's HTTP port takes ``/col/delete?collection=<bucket>``
(every object of the bucket gone). With it, every gRPC and HTTP peer of the master, volume,
filer and admin servers must present a certificate the CA signed; only the S3 port (signed
requests) faces clients. The CA's key is not kept, so nothing here can sign another
certificate. Every file is 0600 in a 0700 folder.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

# The components weed runs (master, volume, filer, the S3 gateway, admin) and its clients (weed
# shell, the gateway's own calls): SeaweedFS reads one section per name.
COMPONENTS = ("master", "volume", "filer", "s3", "admin", "client")
VALID_DAYS = 3650


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def issue(folder: str) -> None:
    """A CA and a certificate + key per component in ``folder`` (once: kept if present).
    Each certificate is for 127.0.0.1 and localhost, for server and client use."""
    if all(os.path.exists(os.path.join(folder, f"{c}.crt")) for c in COMPONENTS):
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(folder, mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, signer, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                                  critical=True)
                   .add_extension(x509.KeyUsage(
                       digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                       crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
        if not ca:
            builder = (builder
                       .add_extension(x509.SubjectAlternativeName([
                           x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                           x509.DNSName("localhost")]), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH]),
                                      critical=False))
        return builder.sign(signer, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca_name = "covidray local SeaweedFS CA"
    ca_key = ec.generate_private_key(ec.SECP256R1())
    _write_private(os.path.join(folder, "ca.crt"),
                   certificate(ca_name, ca_key, ca_name, ca_key, ca=True).public_bytes(pem))
    for component in COMPONENTS:
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(os.path.join(folder, f"{component}.key"), key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        _write_private(os.path.join(folder, f"{component}.crt"), certificate(
            f"covidray-seaweedfs-{component}", key, ca_name, ca_key, ca=False).public_bytes(pem))


HTTPS_SERVERS = ("master", "volume", "filer", "admin")  # HTTP ports: HTTPS, client certificate


def security_sections(folder: str) -> str:
    """The ``security.toml`` text that turns mutual TLS on for every component: gRPC, and
    the HTTP ports of the master, volume, filer and admin servers (whose clients, the S3
    gateway and weed mini's own readiness checks among them, then speak HTTPS with the
    client certificate: without ``[https.admin]`` that check fails and weed mini exits)."""
    def files(name: str) -> str:
        return (f'cert = "{os.path.join(folder, name + ".crt")}"\n'
                f'key = "{os.path.join(folder, name + ".key")}"\n')

    ca = f'ca = "{os.path.join(folder, "ca.crt")}"\n'
    return "".join([f"[grpc]\n{ca}",
                    *(f"\n[grpc.{name}]\n{files(name)}" for name in COMPONENTS),
                    f"\n[https.client]\nenabled = true\n{files('client')}{ca}",
                    *(f"\n[https.{name}]\n{files(name)}{ca}" for name in HTTPS_SERVERS)])
