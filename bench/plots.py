"""Draw docs/img/*.png from bench/results.json (runs in bench/.venv, which has matplotlib).

bench/.venv/bin/python bench/plots.py [bench/results.json] [docs/img]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def issuance(res: dict[str, Any], out: str) -> None:
    scs = res["issuance"]
    fig, axes = plt.subplots(1, len(scs), figsize=(4.2 * len(scs), 4.8), squeeze=False)
    for ax, sc in zip(axes[0], scs, strict=False):
        names = [n for n, s in sc["results"].items() if s["median"] is not None]
        vals = [sc["results"][n]["median"] for n in names]
        colors = [
            "tab:green"
            if n.startswith("synapse")
            else "tab:gray"
            if n.startswith("floor")
            else "tab:blue"
            if n.startswith("certbot")
            else "tab:orange"
            for n in names
        ]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([n.replace(", ", "\n", 1) for n in names], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log)")
        ax.set_title(sc["title"], fontsize=9)
        ax.invert_yaxis()
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "issuance.png"), dpi=110)
    plt.close(fig)


def responder(res: dict[str, Any], out: str) -> None:
    r = res["responder"]
    conns = [str(c) for c in r["connections"]]
    servers = list(r["results"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(servers)
    for i, s in enumerate(servers):
        vals = [r["results"][s][c]["rps"]["median"] for c in conns]
        ax.bar([j + i * width for j in range(len(conns))], vals, width, label=s)
    ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(conns))])
    ax.set_xticklabels([f"{c} connection(s)" for c in conns])
    ax.set_ylabel("requests/s (wrk, median)")
    ax.set_title("HTTP-01 responder throughput, loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "responder.png"), dpi=110)
    plt.close(fig)


def tls(res: dict[str, Any], out: str) -> None:
    rows = res["tls"]["rows"]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    xs = [r["certs"] for r in rows]
    ax1.plot(xs, [r["hs_per_s"] for r in rows], "o-", label="handshakes/s")
    ax1.set_xscale("log")
    ax1.set_xlabel("certificates loaded (log)")
    ax1.set_ylabel("handshakes/s")
    ax1.set_ylim(bottom=0)
    ax2 = ax1.twinx()
    ax2.plot(xs, [r["load_s"] for r in rows], "s--", color="tab:red", label="load time (s)")
    ax2.set_ylabel("load time (s)")
    fig.legend(loc="upper center")
    ax1.set_title("HotSwapTLS: handshakes/s and load time")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tls.png"), dpi=110)
    plt.close(fig)


def renewal(res: dict[str, Any], out: str) -> None:
    rows = res["renewal"]["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for store in ("memory", "file"):
        sel = [r for r in rows if r["store"] == store]
        xs = [r["size"] for r in sel]
        ax.plot(xs, [r["tick_seconds_median"] * 1000 for r in sel], "o-", label=f"tick, {store}")
        ax.plot(
            xs,
            [r["load_and_first_check_seconds"] * 1000 for r in sel],
            "s--",
            label=f"load + first check, {store}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("managed certificates (log)")
    ax.set_ylabel("ms (log)")
    ax.set_title("Renewal check cost (nothing due); slope 1 = linear")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "renewal.png"), dpi=110)
    plt.close(fig)


def main() -> None:
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "bench", "results.json")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "docs", "img")
    os.makedirs(out, exist_ok=True)
    with open(src, encoding="utf-8") as f:
        res = json.load(f)
    for name, fn in (
        ("issuance", issuance),
        ("responder", responder),
        ("tls", tls),
        ("renewal", renewal),
    ):
        if name in res:
            fn(res, out)
            print(f"wrote {out}/{name}.png")


if __name__ == "__main__":
    main()
