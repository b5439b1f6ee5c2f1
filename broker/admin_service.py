"""KeyBrokerAdmin: the operators' servicer. Validate, call one domain operation, convert back."""

from __future__ import annotations

from datetime import timedelta

import grpc
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker import validation as check
from broker.clock import month_label
from broker.convert import key_info
from broker.errors import InvalidArgument
from broker.keys import KeyService
from broker.ledger import Ledger
from broker.money import format_usd
from broker.reconcile import Reconciler
from broker.scheduled_rotation import rotate_older_than
from broker.service import caller_name

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_KEY_AGE = timedelta(days=3650)


class KeyBrokerAdminService(pb_grpc.KeyBrokerAdminServicer):
    def __init__(self, keys: KeyService, ledger: Ledger, reconciler: Reconciler) -> None:
        self.keys = keys
        self.ledger = ledger
        self.reconciler = reconciler

    async def ProvisionKey(
        self, request: pb.ProvisionKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProvisionKeyResponse:
        user_id = check.user_id(request.user_id)
        tier = check.tier(request.tier or "free")
        limit = check.usd(request.monthly_limit_usd, "monthly_limit_usd")
        request_id = check.request_id(request.request_id)
        assert request_id is not None
        user = await self.keys.provision(user_id, tier, limit, request_id, caller_name())
        return pb.ProvisionKeyResponse(key=key_info(user))

    async def UpdateKey(
        self, request: pb.UpdateKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateKeyResponse:
        user_id = check.user_id(request.user_id)
        tier = check.tier(request.tier) if request.HasField("tier") else None
        clear_limit = request.HasField("monthly_limit_usd") and request.monthly_limit_usd == ""
        limit = check.usd(request.monthly_limit_usd, "monthly_limit_usd")
        disabled = request.disabled if request.HasField("disabled") else None
        rpm = None
        if request.HasField("requests_per_minute"):
            rpm = check.bounded(request.requests_per_minute, "requests_per_minute", 0, 1_000_000)
        user = await self.keys.update(
            user_id,
            caller_name(),
            tier=tier,
            custom_limit=limit,
            clear_custom_limit=clear_limit,
            disabled=disabled,
            requests_per_minute=rpm,
        )
        return pb.UpdateKeyResponse(key=key_info(user))

    async def RevokeKey(
        self, request: pb.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeKeyResponse:
        user_id = check.user_id(request.user_id)
        user = await self.keys.revoke(user_id, request.delete, caller_name())
        return pb.RevokeKeyResponse(key=key_info(user))

    async def GetKeyInfo(
        self, request: pb.GetKeyInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetKeyInfoResponse:
        user = await self.keys.info(check.user_id(request.user_id))
        return pb.GetKeyInfoResponse(key=key_info(user))

    async def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListKeysResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        users, next_token = await self.keys.list(request.page_token, request.page_size or DEFAULT_PAGE_SIZE)
        return pb.ListKeysResponse(keys=[key_info(u) for u in users], next_page_token=next_token)

    async def GetUsageSummary(
        self, request: pb.GetUsageSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUsageSummaryResponse:
        user_id = check.user_id(request.user_id)
        month = check.month(request.month)
        await self.keys.info(user_id)  # NOT_FOUND for unknown users
        summary = await self.ledger.usage_summary(user_id, month)
        totals = summary.totals
        return pb.GetUsageSummaryResponse(
            total_requests=totals.requests,
            total_tokens=totals.tokens,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            total_cost_usd=format_usd(totals.cost_usd),
            by_model=[
                pb.ModelUsage(
                    model=g.name, requests=g.requests, tokens=g.tokens, cost_usd=format_usd(g.cost_usd)
                )
                for g in summary.by_model
            ],
            by_agent=[
                pb.AgentUsage(
                    agent=g.name, requests=g.requests, tokens=g.tokens, cost_usd=format_usd(g.cost_usd)
                )
                for g in summary.by_agent
            ],
            month=month_label(summary.month),
        )

    async def Reconcile(
        self, request: pb.ReconcileRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReconcileResponse:
        report = await self.reconciler.run(dry_run=request.dry_run)
        return pb.ReconcileResponse(
            provider_keys=report.provider_keys,
            database_keys=report.database_keys,
            dry_run=report.dry_run,
            findings=[
                pb.ReconcileFinding(
                    kind=pb.ReconcileFindingKind.Value(f"RECONCILE_FINDING_KIND_{f.kind}"),
                    user_id=f.user_id,
                    key_id=f.key_id,
                    detail=f.detail,
                    provider_usd=format_usd(f.provider_usd),
                    broker_usd=format_usd(f.broker_usd),
                    fixed=f.fixed,
                )
                for f in report.findings
            ],
        )

    async def RotateKeys(
        self, request: pb.RotateKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateKeysResponse:
        older_than = check.duration(request.older_than, "older_than", MAX_KEY_AGE)
        grace = check.duration(request.grace_period, "grace_period", check.MAX_GRACE)
        run = await rotate_older_than(
            self.keys, older_than, grace, request.delete_old, caller_name(), request.dry_run
        )
        return pb.RotateKeysResponse(
            rotated_user_ids=run.rotated,
            failures=[pb.RotateKeysFailure(user_id=u, reason=r) for u, r in run.failed],
        )
