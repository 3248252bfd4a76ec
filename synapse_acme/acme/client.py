"""RFC 8555 resources, one method each, typed with certbot's ``acme.messages``.

No flow logic lives here (that is :mod:`synapse_acme.acme.issuer`): each method is one request and
one parsed answer, so the issuer reads like the RFC's section 7.1 diagram.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import attrs
import josepy as jose
from acme import challenges, messages
from cryptography import x509
from twisted.internet.defer import Deferred

from synapse_acme.acme.transport import JSON, PEM_CHAIN, AcmeResponse, JWSTransport, check_url
from synapse_acme.errors import AccountRefused, AcmeError, AcmeProtocolError, ConfigError
from synapse_acme.model import RenewalWindow

log = logging.getLogger(__name__)

T = TypeVar("T")


@attrs.frozen
class Fetched(Generic[T]):
    """An ACME object with the URL it lives at and the Retry-After (seconds) that came with it."""

    url: str
    body: T
    retry_after: float | None = None


class _NewOrder(messages.NewOrder):
    """newOrder with RFC 9773's ``replaces`` (acme 5.x's NewOrder lacks the field)."""

    replaces: str | None = jose.field("replaces", omitempty=True)


class _EmptyObject(jose.JSONObjectWithFields):
    """``{}``: the payload that tells the CA to validate a challenge (RFC 8555 7.5.1)."""


def _parse(cls: Any, resp: AcmeResponse) -> Any:
    try:
        obj = cls.from_json(resp.json)
    except (jose.DeserializationError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise AcmeProtocolError(
            f"the {cls.__name__} object does not parse: {e}", resp.url, resp.status
        ) from None
    _check_urls(obj, resp.url)
    return obj


def _check_urls(obj: Any, where: str) -> None:
    """Every URL an order or authorization points us to must be an http(s) URL (we will POST
    our signed requests there)."""
    if isinstance(obj, messages.Order):
        if obj.finalize is not None:
            check_url(obj.finalize, "the order's finalize URL", where)
        if obj.certificate is not None:
            check_url(obj.certificate, "the order's certificate URL", where)
        for authz in obj.authorizations or ():
            check_url(authz, "an authorization URL", where)
    elif isinstance(obj, messages.Authorization):
        for challb in obj.challenges or ():
            check_url(challb.uri, "a challenge URL", where)


@attrs.define
class AcmeClient:
    """The CA's resources, over one :class:`~synapse_acme.acme.transport.JWSTransport`.

    ``account_url`` is set by :meth:`register` and used as the JWS ``kid`` afterwards.
    """

    transport: JWSTransport
    account_url: str | None = None

    def directory(self) -> Deferred[messages.Directory]:
        """Deferred firing with the (cached) directory."""
        return self.transport.directory()

    def _kid(self) -> str:
        if self.account_url is None:
            raise RuntimeError("AcmeClient.register() must succeed before other requests")
        return self.account_url

    # -- accounts ---------------------------------------------------------------------------

    def register(
        self,
        contact: Sequence[str],
        tos_agreed: bool,
        eab: tuple[str, str] | None = None,
        eab_setting: str = "acme.eab",
    ) -> Deferred[str]:
        """Create (or find, if this key already has one) the account; Deferred firing with its
        URL. Fails with ConfigError when the CA needs terms agreement or EAB we lack, and with
        :class:`~synapse_acme.errors.AccountRefused` (a ConfigError) naming ``eab_setting``
        when the CA refuses the binding we sent (wrong kid or HMAC key) or asks for one."""
        return Deferred.fromCoroutine(self._register(tuple(contact), tos_agreed, eab, eab_setting))

    async def _register(
        self,
        contact: tuple[str, ...],
        tos_agreed: bool,
        eab: tuple[str, str] | None,
        eab_setting: str,
    ) -> str:
        directory = await self.directory()
        meta = directory.meta
        tos = meta.terms_of_service
        if tos and not tos_agreed:
            raise ConfigError(
                "acme.terms_of_service_agreed",
                f"the CA requires agreeing to its terms at {tos}; set it to true",
                False,
            )
        binding = None
        if eab is not None:
            kid, hmac_key = eab
            try:
                binding = messages.ExternalAccountBinding.from_data(
                    account_public_key=self.transport.key.public_key(),
                    kid=kid,
                    hmac_key=hmac_key,
                    directory=directory,
                )
            except (ValueError, TypeError):
                raise ConfigError(
                    f"{eab_setting}.hmac_key", "expected base64url", has_value=False
                ) from None
        elif meta.external_account_required:
            raise ConfigError(
                eab_setting,
                "the CA requires external account binding (its directory says "
                "externalAccountRequired): set kid and hmac_key from your CA",
                has_value=False,
            )
        reg = messages.NewRegistration.from_data(
            contact=contact,
            terms_of_service_agreed=True if tos_agreed else None,
            external_account_binding=binding,
        )
        try:
            resp = await self.transport.post(
                directory["newAccount"], reg, kid=None, endpoint="newAccount"
            )
        except AcmeError as e:
            raise _eab_refusal(e, eab, eab_setting) or e from None
        url = resp.location
        if not url:
            raise AcmeProtocolError("newAccount answer has no Location", resp.url, resp.status)
        check_url(url, "the account URL (Location)", resp.url)
        log.info("%s ACME account %s", "created" if resp.status == 201 else "using existing", url)
        self.account_url = url
        return url

    # -- orders -----------------------------------------------------------------------------

    def new_order(
        self,
        identifiers: Sequence[str],
        replaces: str | None = None,
        profile: str | None = None,
    ) -> Deferred[Fetched[messages.Order]]:
        """Place an order for DNS ``identifiers``. ``replaces`` (an ARI CertID) is sent only if
        the CA offers ARI, as RFC 9773 asks. Deferred firing with the order and its URL."""
        return Deferred.fromCoroutine(self._new_order(tuple(identifiers), replaces, profile))

    async def _new_order(
        self, identifiers: tuple[str, ...], replaces: str | None, profile: str | None
    ) -> Fetched[messages.Order]:
        directory = await self.directory()
        if replaces is not None and _url_in(directory, "renewalInfo") is None:
            replaces = None
        order = _NewOrder(
            identifiers=[
                messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=name)
                for name in identifiers
            ],
            profile=profile,
            replaces=replaces,
        )
        resp = await self.transport.post(
            directory["newOrder"], order, kid=self._kid(), endpoint="newOrder"
        )
        url = resp.location
        if not url:
            raise AcmeProtocolError("newOrder answer has no Location", resp.url, resp.status)
        check_url(url, "the order URL (Location)", resp.url)
        body = _parse(messages.Order, resp)
        if not body.finalize or body.authorizations is None:
            raise AcmeProtocolError("order lacks finalize or authorizations", url, resp.status)
        return Fetched(url, body, resp.retry_after)

    def get_order(self, url: str) -> Deferred[Fetched[messages.Order]]:
        """POST-as-GET an order; Deferred firing with its current state."""
        return Deferred.fromCoroutine(self._get(url, messages.Order, "order"))

    def get_authorization(self, url: str) -> Deferred[Fetched[messages.Authorization]]:
        """POST-as-GET an authorization; Deferred firing with its current state."""
        return Deferred.fromCoroutine(self._get(url, messages.Authorization, "authorization"))

    async def _get(self, url: str, cls: Any, endpoint: str) -> Fetched[Any]:
        resp = await self.transport.post(url, None, kid=self._kid(), endpoint=endpoint)
        return Fetched(url, _parse(cls, resp), resp.retry_after)

    def answer_challenge(
        self, url: str, response: challenges.ChallengeResponse | None = None
    ) -> Deferred[Fetched[messages.ChallengeBody]]:
        """Tell the CA the challenge at ``url`` is ready to be checked (payload ``{}``)."""
        return Deferred.fromCoroutine(self._answer(url, response))

    async def _answer(
        self, url: str, response: challenges.ChallengeResponse | None
    ) -> Fetched[messages.ChallengeBody]:
        obj = response if response is not None else _EmptyObject()
        resp = await self.transport.post(url, obj, kid=self._kid(), endpoint="challenge")
        return Fetched(url, _parse(messages.ChallengeBody, resp), resp.retry_after)

    def finalize(
        self, order: Fetched[messages.Order], csr_der: bytes
    ) -> Deferred[Fetched[messages.Order]]:
        """Send the CSR to the order's finalize URL; Deferred firing with the updated order."""
        return Deferred.fromCoroutine(self._finalize(order, csr_der))

    async def _finalize(
        self, order: Fetched[messages.Order], csr_der: bytes
    ) -> Fetched[messages.Order]:
        request = messages.CertificateRequest(csr=x509.load_der_x509_csr(csr_der))
        resp = await self.transport.post(
            order.body.finalize, request, kid=self._kid(), endpoint="finalize"
        )
        return Fetched(order.url, _parse(messages.Order, resp), resp.retry_after)

    def download_chain(self, url: str) -> Deferred[tuple[bytes, list[str]]]:
        """Deferred firing with the PEM chain at ``url`` and the URLs of alternate chains
        (``Link: rel="alternate"``)."""
        return Deferred.fromCoroutine(self._download(url))

    async def _download(self, url: str) -> tuple[bytes, list[str]]:
        resp = await self.transport.post(
            url, None, kid=self._kid(), expect=PEM_CHAIN, endpoint="certificate"
        )
        if b"-----BEGIN CERTIFICATE-----" not in resp.body:
            raise AcmeProtocolError("the certificate chain holds no PEM certificate", url)
        alternates = resp.links("alternate")
        for alt in alternates:
            check_url(alt, "an alternate chain URL", url)
        return resp.body, alternates

    # -- ARI (RFC 9773) ---------------------------------------------------------------------

    def renewal_info(self, cert_id: str) -> Deferred[RenewalWindow | None]:
        """GET ``renewalInfo/<cert_id>``; Deferred firing with the suggested window, or
        ``None`` when the CA offers no ARI."""
        return Deferred.fromCoroutine(self._renewal_info(cert_id))

    async def _renewal_info(self, cert_id: str) -> RenewalWindow | None:
        directory = await self.directory()
        base = _url_in(directory, "renewalInfo")
        if base is None:
            return None
        url = f"{base.rstrip('/')}/{cert_id}"
        resp = await self.transport.get(url, expect=JSON, endpoint="renewalInfo")
        info = _parse(messages.RenewalInfo, resp)
        start, end = info.suggested_window.start, info.suggested_window.end
        if start is None or end is None or end < start:
            raise AcmeProtocolError("renewalInfo has no valid suggestedWindow", url)
        explanation = resp.json.get("explanationURL")
        return RenewalWindow(
            start=_aware(start),
            end=_aware(end),
            retry_after=resp.retry_after,
            explanation_url=explanation if isinstance(explanation, str) else None,
        )


# Problems a CA answers to a newAccount whose binding it does not accept: Pebble says
# unauthorized for a wrong HMAC key and for an unknown kid; others say malformed, or
# externalAccountRequired when the binding is missing.
_EAB_PROBLEMS = ("unauthorized", "malformed", "externalAccountRequired")


def _eab_refusal(
    problem: AcmeError, eab: tuple[str, str] | None, setting: str
) -> AccountRefused | None:
    """The error naming ``setting`` for a newAccount ``problem`` caused by the binding (or
    its absence), None for any other problem. Names the kid, never the HMAC key."""
    if eab is None:
        if problem.code != "externalAccountRequired":
            return None
        why = "the CA requires external account binding: set kid and hmac_key from your CA"
    else:
        if problem.code not in _EAB_PROBLEMS:
            return None
        why = (
            f"the CA refused the external account binding with kid {eab[0]!r}: check that kid "
            "and hmac_key are the ones this CA gave for this account"
        )
    return AccountRefused(setting, f"{why} (the CA's problem: {problem})", problem)


def _url_in(directory: messages.Directory, name: str) -> str | None:
    try:
        value = directory[name]
    except KeyError:
        return None
    return value if isinstance(value, str) and value else None


def _aware(when: datetime.datetime) -> datetime.datetime:
    if when.tzinfo is None:
        return when.replace(tzinfo=datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc)


__all__ = ["AcmeClient", "Fetched"]
