"""`aforo-sidecar apigee-pull`: read Apigee's stats API for a time range and post it to
the sidecar's /integrations/apigee/ingest, bucket by bucket.

The stats query asks for dimensions apiproxy,developer_app,api_product and the sums
of message_count, total_response_time, response_size and is_error, per time unit. A
rate-limited or unavailable answer (429, 503) is retried with backoff, honouring
Retry-After; ingestion deduplicates, so a pull repeated over the same range is safe.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
import msgspec

from sidecar.http.ingest import SECRET_HEADER, TENANT_HEADER
from sidecar.integrations.apigee.analytics import from_stats_response
from sidecar.integrations.gateway_http import retry_after_seconds

TIME_UNITS = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
SELECT = "sum(message_count),sum(total_response_time),sum(response_size),sum(is_error)"
RETRYABLE = {429, 502, 503, 504}


def _apigee_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%m/%d/%Y %H:%M")


def _get_with_backoff(
    client: httpx.Client, url: str, params: dict[str, str], attempts: int
) -> httpx.Response:
    delay = 1.0
    for attempt in range(1, attempts + 1):
        response = client.get(url, params=params)
        if response.status_code not in RETRYABLE or attempt == attempts:
            return response
        # apigee-pull runs unattended: it waits as long as Apigee asks.
        wait = retry_after_seconds(response.headers.get("retry-after"), delay, cap=math.inf)
        print(f"apigee answered {response.status_code}; retrying in {wait:g}s", file=sys.stderr)
        time.sleep(wait)
        delay = min(delay * 2, 60)
    raise AssertionError("unreachable")


def pull(args: argparse.Namespace) -> int:
    end = datetime.fromisoformat(args.end) if args.end else datetime.now(tz=UTC)
    start = datetime.fromisoformat(args.start) if args.start else end - timedelta(hours=1)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    url = f"{args.apigee_url.rstrip('/')}/v1/organizations/{args.org}/environments/{args.env}/stats/"
    url += "apiproxy,developer_app,api_product"
    params = {
        "select": SELECT,
        "timeRange": f"{_apigee_time(start)}~{_apigee_time(end)}",
        "timeUnit": args.time_unit,
    }
    with httpx.Client(headers=headers, timeout=60) as apigee:
        response = _get_with_backoff(apigee, url, params, args.attempts)
    if response.status_code != 200:
        print(f"apigee stats query failed: {response.status_code} {response.text[:500]}", file=sys.stderr)
        return 1
    payloads = from_stats_response(
        response.json(), organization=args.org, time_unit_ms=TIME_UNITS[args.time_unit]
    )
    processed = skipped = 0
    secret = args.ingest_secret if args.ingest_secret is not None else _ingest_secret(args.tenant)
    sidecar_headers = {TENANT_HEADER: args.tenant, SECRET_HEADER: secret}
    with httpx.Client(base_url=args.sidecar_url, headers=sidecar_headers, timeout=60) as sidecar:
        for payload in payloads:
            answer = sidecar.post("/integrations/apigee/ingest", content=msgspec.json.encode(payload))
            if answer.status_code != 200:
                print(f"sidecar refused a bucket: {answer.status_code} {answer.text[:500]}", file=sys.stderr)
                return 1
            processed += answer.json()["recordsProcessed"]
            skipped += answer.json()["recordsSkipped"]
    print(f"{len(payloads)} buckets, {processed} records processed, {skipped} skipped")
    return 0


def _ingest_secret(tenant: str) -> str:
    """The tenant's entry of AFORO_INGEST_SECRETS ("tenant=secret,..."), the variable
    the sidecar itself reads, so one environment serves both."""
    for item in os.environ.get("AFORO_INGEST_SECRETS", "").split(","):
        name, _, secret = item.strip().partition("=")
        if name.strip() == tenant:
            return secret.strip()
    return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--apigee-url",
        default="https://apigee.googleapis.com",
        help="Apigee management API base URL (default https://apigee.googleapis.com)",
    )
    parser.add_argument("--org", required=True, help="Apigee organization (required)")
    parser.add_argument("--env", required=True, help="Apigee environment (required)")
    parser.add_argument(
        "--token",
        default=os.environ.get("APIGEE_TOKEN", ""),
        help="OAuth bearer token for the management API (APIGEE_TOKEN; default none)",
    )
    parser.add_argument("--start", help="ISO 8601 start of the range (default: an hour before --end)")
    parser.add_argument("--end", help="ISO 8601 end of the range (default: now)")
    parser.add_argument(
        "--time-unit",
        choices=sorted(TIME_UNITS),
        default="hour",
        help="bucket size: day, hour or minute (default hour)",
    )
    parser.add_argument(
        "--attempts", type=int, default=6, help="tries on 429/502/503/504 before giving up (default 6)"
    )
    parser.add_argument(
        "--sidecar-url",
        default="http://127.0.0.1:8080",
        help="the sidecar's HTTP port (default http://127.0.0.1:8080)",
    )
    parser.add_argument(
        "--tenant", default="default", help="tenant the analytics belong to (default default)"
    )
    parser.add_argument(
        "--ingest-secret",
        help="the tenant's ingestion secret (default: its entry of AFORO_INGEST_SECRETS, "
        "tenant=secret,..., the variable the sidecar reads)",
    )
