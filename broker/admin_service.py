"""KeyBrokerAdmin: the operators' servicer. Validate, call one domain operation, convert back."""

from __future__ import annotations

from datetime import timedelta

import grpc
from keybroker.v1 import keybroker_pb2 as pb
from keybroker.v1 import keybroker_pb2_grpc as pb_grpc

from broker import validation as check
from broker.alerts import AlertFilter, AlertRow, list_alerts
from broker.clock import month_label
from broker.convert import key_info, timestamp
from broker.errors import InvalidArgument
from broker.keys import KeyService
from broker.ledger import Ledger
from broker.money import format_usd
from broker.reconcile import Reconciler
from broker.reports import CostReports, DailyReport, MonthlyReport, percent_used
from broker.scheduled_rotation import rotate_older_than
from broker.service import caller_name

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Cost report rows are small (~100 bytes): 10,000 of them stay far below gRPC's 4 MB limit.
MAX_REPORT_PAGE_SIZE = 10_000
MAX_KEY_AGE = timedelta(days=3650)
ALERT_KINDS = {pb.ALERT_KIND_THRESHOLD: "THRESHOLD", pb.ALERT_KIND_ANOMALY: "ANOMALY"}


class KeyBrokerAdminService(pb_grpc.KeyBrokerAdminServicer):
    def __init__(
        self,
        keys: KeyService,
        ledger: Ledger,
        reconciler: Reconciler,
        cost_reports: CostReports | None = None,
    ) -> None:
        self.keys = keys
        self.ledger = ledger
        self.reconciler = reconciler
        self.cost_reports = cost_reports or CostReports(ledger.db, ledger.clock)

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

    async def GetCostReport(
        self, request: pb.GetCostReportRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCostReportResponse:
        if not 0 <= request.page_size <= MAX_REPORT_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be between 0 and {MAX_REPORT_PAGE_SIZE}")
        page = (request.page_size, request.page_token)
        if request.kind == pb.COST_REPORT_KIND_DAILY:
            day = check.day(request.date, "date")
            if request.month:
                raise InvalidArgument("month", "applies only to COST_REPORT_KIND_MONTHLY")
            return daily_report_response(await self.cost_reports.daily(day, *page))
        if request.kind == pb.COST_REPORT_KIND_MONTHLY:
            month = check.month(request.month, "month")
            if request.date:
                raise InvalidArgument("date", "applies only to COST_REPORT_KIND_DAILY")
            return monthly_report_response(await self.cost_reports.monthly(month, *page))
        raise InvalidArgument("kind", "must be COST_REPORT_KIND_DAILY or COST_REPORT_KIND_MONTHLY")

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

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertsResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        if request.kind not in (pb.ALERT_KIND_UNSPECIFIED, *ALERT_KINDS):
            raise InvalidArgument("kind", "must be ALERT_KIND_THRESHOLD, ALERT_KIND_ANOMALY or unset")
        where = AlertFilter(
            user_id=check.user_id(request.user_id) if request.user_id else None,
            kind=ALERT_KINDS.get(request.kind),
            undelivered_only=request.undelivered_only,
        )
        rows, next_token = await list_alerts(
            self.ledger.db, where, request.page_token, request.page_size or DEFAULT_PAGE_SIZE
        )
        return pb.ListAlertsResponse(alerts=[alert_message(a) for a in rows], next_page_token=next_token)


def daily_report_response(report: DailyReport) -> pb.GetCostReportResponse:
    return pb.GetCostReportResponse(
        period=report.day.isoformat(),
        daily=[
            pb.DailyCostRow(
                user_id=r.user_id,
                model=r.model,
                requests=r.requests,
                tokens=r.tokens,
                cost_usd=format_usd(r.cost_usd),
            )
            for r in report.rows
        ],
        total_cost_usd=format_usd(report.total_cost_usd),
        next_page_token=report.next_page_token,
    )


def monthly_report_response(report: MonthlyReport) -> pb.GetCostReportResponse:
    rows = []
    for r in report.rows:
        percent = percent_used(r.spent_usd, r.limit_usd)
        rows.append(
            pb.MonthlyCostRow(
                user_id=r.user_id,
                spent_usd=format_usd(r.spent_usd),
                limit_usd=format_usd(r.limit_usd),
                percent_used="" if percent is None else f"{percent:.2f}",
                requests=r.requests,
                top_models=[f"{model}={format_usd(cost)}" for model, cost in r.top_models],
            )
        )
    return pb.GetCostReportResponse(
        period=month_label(report.month),
        monthly=rows,
        total_cost_usd=format_usd(report.total_cost_usd),
        next_page_token=report.next_page_token,
    )


def alert_message(alert: AlertRow) -> pb.Alert:
    return pb.Alert(
        alert_id=str(alert.alert_id),
        kind=pb.ALERT_KIND_THRESHOLD if alert.kind == "THRESHOLD" else pb.ALERT_KIND_ANOMALY,
        user_id=alert.user_id,
        month=month_label(alert.period_start),
        threshold_percent=alert.threshold_percent or 0,
        spent_usd=format_usd(alert.spent_usd),
        reference_usd=format_usd(alert.reference_usd),
        create_time=timestamp(alert.create_time),
        deliver_time=timestamp(alert.deliver_time),
        attempts=alert.attempts,
        last_error=alert.last_error or "",
    )
