"""RFC 2136 dynamic updates and the checks around them, over dnspython: the
:class:`~synapse_acme.dns01.DnsBackend` of the DNS-01 responder.

Blocking (dnspython): :class:`~synapse_acme.dns01.DNS01Responder` runs every call in a thread.
Kept apart from :mod:`synapse_acme.dns01` so that dnspython is imported only by a setup that
answers DNS-01 challenges.
"""

from __future__ import annotations

import socket

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.update

from synapse_acme.dns01 import QUERY_TIMEOUT, Dns01Settings, Server, format_server
from synapse_acme.errors import Dns01Error

#: dnspython's name for each algorithm of :data:`synapse_acme.dns01.TSIG_ALGORITHMS`.
TSIG_ALGORITHM_NAMES: dict[str, dns.name.Name] = {
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-md5": dns.tsig.HMAC_MD5,
}


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


def build_update(
    settings: Dns01Settings, action: str, name: str, value: str
) -> dns.message.Message:
    """The TSIG-signed RFC 2136 update that adds (``action='add'``) or deletes
    (``'delete'``) exactly the TXT value ``value`` at ``name``, leaving other values alone."""
    keyname = _absolute(settings.tsig_key_name)
    keyring = {
        keyname: dns.tsig.Key(
            keyname, settings.tsig_secret, TSIG_ALGORITHM_NAMES[settings.tsig_algorithm]
        )
    }
    update = dns.update.UpdateMessage(
        _absolute(settings.zone),
        keyring=keyring,
        keyname=keyname,
        keyalgorithm=TSIG_ALGORITHM_NAMES[settings.tsig_algorithm],
    )
    rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode("ascii")])
    if action == "add":
        update.add(_absolute(name), settings.ttl, rdata)
    elif action == "delete":
        update.delete(_absolute(name), rdata)
    else:
        raise ValueError(f"unknown update action {action!r}")
    return update


@attrs.define
class Rfc2136Backend:
    """:class:`DnsBackend` on a real primary server: dnspython, blocking (run it in a thread)."""

    settings: Dns01Settings
    timeout: float = QUERY_TIMEOUT

    def _update(self, action: str, name: str, value: str) -> None:
        message = build_update(self.settings, action, name, value)
        host, port = self.settings.server
        where = f"{format_server(self.settings.server)} ({self.settings.config_path}.server)"
        try:
            response = dns.query.tcp(message, host, timeout=self.timeout, port=port)
        except dns.tsig.PeerError as e:  # BADKEY / BADSIG / BADTIME from the server
            raise Dns01Error(
                f"{where} refused the TSIG signature of the update ({e}): check "
                f"{self.settings.config_path}.tsig_key_name, tsig_algorithm and the secret in "
                "tsig_secret_file against the server's key"
            ) from None
        except (OSError, dns.exception.DNSException) as e:
            raise Dns01Error(f"could not {action} the TXT record {name} at {where}: {e}") from None
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            hint = {
                dns.rcode.REFUSED: f"the server does not allow this key to update {name} "
                "(BIND: allow-update or update-policy for the key)",
                dns.rcode.NOTAUTH: f"the server is not authoritative for "
                f"{self.settings.config_path}.zone {self.settings.zone}, or refused the key",
                dns.rcode.NOTZONE: f"{name} is outside {self.settings.config_path}.zone",
            }.get(rcode, "see the server's log")
            raise Dns01Error(
                f"{where} answered {dns.rcode.to_text(rcode)} to the update that would "
                f"{action} the TXT record {name}: {hint}"
            )

    def add(self, name: str, value: str) -> None:
        self._update("add", name, value)

    def delete(self, name: str, value: str) -> None:
        self._update("delete", name, value)

    def _query(
        self, server: Server, name: str, rdtype: dns.rdatatype.RdataType
    ) -> dns.message.Message:
        query = dns.message.make_query(_absolute(name), rdtype)
        query.flags &= ~dns.flags.RD  # ask the server itself, not whatever it would recurse to
        # A forged or garbled UDP answer is skipped, not taken as the answer (CVE-2023-29483).
        response, _ = dns.query.udp_with_fallback(
            query,
            server[0],
            timeout=self.timeout,
            port=server[1],
            ignore_unexpected=True,
            ignore_errors=True,
        )
        return response

    def txt_values(self, server: Server, name: str) -> set[str]:
        """The TXT values ``server`` itself answers for ``name`` (empty when none)."""
        try:
            response = self._query(server, name, dns.rdatatype.TXT)
        except (OSError, dns.exception.DNSException) as e:
            raise Dns01Error(f"no answer from {format_server(server)}: {e}") from None
        values: set[str] = set()
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.TXT and rrset.name == _absolute(name):
                for rdata in rrset:
                    values.add(b"".join(rdata.strings).decode("ascii", "replace"))
        return values

    def authoritative_servers(self) -> list[Server]:
        """Where the record must be visible: :attr:`Dns01Settings.propagation_servers`, or the
        zone's NS servers (port 53) as the primary lists them, plus the primary itself."""
        if self.settings.propagation_servers is not None:
            return list(self.settings.propagation_servers)
        servers = [self.settings.server]
        try:
            response = self._query(self.settings.server, self.settings.zone, dns.rdatatype.NS)
        except (OSError, dns.exception.DNSException) as e:
            raise Dns01Error(
                f"could not list the NS servers of {self.settings.zone} at "
                f"{format_server(self.settings.server)}: {e} (or set "
                f"{self.settings.config_path}.propagation_servers)"
            ) from None
        hosts = [
            str(rdata.target)
            for rrset in response.answer
            if rrset.rdtype == dns.rdatatype.NS
            for rdata in rrset
        ]
        for host in hosts:
            for address in self._addresses(host):
                if (address, 53) not in servers:
                    servers.append((address, 53))
        return servers

    def _addresses(self, host: str) -> list[str]:
        """``host``'s addresses: asked at the primary first (glue for in-zone NS names), then
        the system's resolver."""
        found: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                response = self._query(self.settings.server, host, rdtype)
            except (OSError, dns.exception.DNSException):
                continue
            for rrset in response.answer:
                if rrset.rdtype == rdtype:
                    found.extend(rdata.address for rdata in rrset)
        if found:
            return found
        try:
            infos = socket.getaddrinfo(host.rstrip("."), 53, proto=socket.IPPROTO_UDP)
        except OSError as e:
            raise Dns01Error(
                f"the NS server {host} of {self.settings.zone} has no address: {e} (or set "
                f"{self.settings.config_path}.propagation_servers)"
            ) from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


__all__ = ["TSIG_ALGORITHM_NAMES", "Rfc2136Backend", "build_update"]
