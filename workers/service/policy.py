"""Who may do what: principals, key creators, signers, owners and admins.

The principal of a request is its AMQP ``user_id``. RabbitMQ closes the channel of a publisher
whose ``user_id`` differs from the user it logged in as, so a worker can trust it — but the
broker checks only when the property is set, so a request without it has no principal and is
refused, unless ``allow_anonymous`` relaxes that for a closed test network.
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts.errors import Forbidden
from vault.records import KeyRecord
from workers.consumer.runtime import RequestContext
from workers.service.config import Settings

#: In ``allowed_signers`` and ``key_creators``: any authenticated principal.
ANYONE = "*"
#: The principal of a request without ``user_id`` when anonymous requests are allowed.
ANONYMOUS_PRINCIPAL = "anonymous"
#: As long as a name in ``allowed_signers`` may be (contracts.models.Principal), and as much
#: of a name as the audit log keeps: a longer one could not be told apart from its prefix.
MAX_PRINCIPAL_CHARS = 128


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The access rules a worker enforces."""

    admins: frozenset[str] = frozenset()
    key_creators: frozenset[str] = frozenset({ANYONE})
    allow_anonymous: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        """The policy ``ZANDD_ADMINS``, ``ZANDD_KEY_CREATORS`` and ``ZANDD_ALLOW_ANONYMOUS`` set."""
        return cls(
            admins=frozenset(settings.admins),
            key_creators=frozenset(settings.key_creators),
            allow_anonymous=settings.allow_anonymous,
        )

    def principal(self, context: RequestContext) -> str:
        """Who is asking; ``Forbidden`` for a request without ``user_id`` (unless allowed).

        A broker user named ``*`` would own keys that anyone may use (``*`` means "any
        principal" in ``allowed_signers``), and one longer than 128 characters could not be
        named in ``allowed_signers`` nor told apart in the audit: both are refused.
        """
        if context.principal == ANYONE:
            raise Forbidden(
                f"{context.operation.value} refused: the user name '*' is reserved "
                "(it means any principal)"
            )
        if context.principal and len(context.principal) > MAX_PRINCIPAL_CHARS:
            raise Forbidden(
                f"{context.operation.value} refused: user names longer than "
                f"{MAX_PRINCIPAL_CHARS} characters are not principals"
            )
        if context.principal:
            return context.principal
        if self.allow_anonymous:
            return ANONYMOUS_PRINCIPAL
        raise Forbidden(
            f"{context.operation.value} refused: the request has no user_id, so the broker did "
            "not vouch for who sent it (set the AMQP user_id property to your user name)"
        )

    def check_create(self, principal: str) -> None:
        """Whether ``principal`` may create keys."""
        if ANYONE not in self.key_creators and principal not in self.key_creators:
            raise Forbidden(f"{principal!r} may not create keys")

    def check_sign(self, record: KeyRecord, principal: str) -> None:
        """Whether ``principal`` may sign with the key (its ``allowed_signers``)."""
        if ANYONE not in record.allowed_signers and principal not in record.allowed_signers:
            raise Forbidden(f"{principal!r} may not sign with key {record.key_id}")

    def check_manage(self, record: KeyRecord, principal: str) -> None:
        """Whether ``principal`` may change the key's state: its owner and the admins."""
        if principal != record.owner and principal not in self.admins:
            raise Forbidden(f"{principal!r} may not change the state of key {record.key_id}")

    # -- issue 15, reads: verify, verify.batch, key.list, key.describe ---------------------

    def may_read(self, record: KeyRecord, principal: str) -> bool:
        """Whether ``principal`` may verify with the key and describe it: whoever may sign
        with it (its ``allowed_signers``, ``*`` meaning anyone authenticated), its owner and
        the admins. ``key.public`` stays open to anyone authenticated (the public key is
        public); these serve the key's own users, and ``key.describe`` shows its metadata."""
        return (
            ANYONE in record.allowed_signers
            or principal in record.allowed_signers
            or principal == record.owner
            or principal in self.admins
        )

    def check_read(self, record: KeyRecord, principal: str, what: str) -> None:
        """``Forbidden`` unless ``principal`` may read the key (``may_read``); ``what`` names
        the operation. Access before state: a refused caller learns nothing of the key."""
        if not self.may_read(record, principal):
            raise Forbidden(f"{principal!r} may not {what} key {record.key_id}")

    def sees_access(self, record: KeyRecord, principal: str) -> bool:
        """Whether ``principal`` sees who owns the key and who may sign with it (the owner
        and the admins; a mere signer does not learn the other signers' names)."""
        return principal == record.owner or principal in self.admins

    def check_list_all(self, principal: str) -> None:
        """Listing every key (``key.list`` with scope ``all``) is for the admins."""
        if principal not in self.admins:
            raise Forbidden(f"{principal!r} may not list every key (scope 'all' is for admins)")
