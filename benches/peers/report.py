"""The table, the ratios, the targets and the plot of scripts/bench.sh.

Usage: report.py RESULTS_JSON RESTORE_LOG MODE PLOT_PNG TABLE_MD

RESULTS_JSON is what benches/compare.rs wrote, RESTORE_LOG the output of
`cargo bench --bench restore`. Prints the table; writes it as Markdown to
TABLE_MD and the plot to PLOT_PNG. Every figure comes from those files.
"""

import json
import math
import re
import sys

NAMES = {"l1": "L1 raw EOS passthrough", "lk": "Lk passthrough x k", "quix": "Quix Streams 3.28", "baton": "baton"}
ORDER = ["l1", "lk", "quix", "baton"]


def fmt(value, digits=0):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def half_peak(peer):
    loads = peer.get("loads") or []
    if not loads:
        return {}
    return min(loads, key=lambda p: abs(p.get("fraction", 0) - 0.5))


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def main():
    results_path, restore_path, mode, plot_path, table_path = sys.argv[1:6]
    with open(results_path) as f:
        results = json.load(f)
    peers = results["peers"]
    restore = None
    restore_line = ""
    try:
        with open(restore_path) as f:
            for line in f:
                m = re.match(r"restore into RocksDB:\s+([0-9.]+) records/s", line)
                if m:
                    restore = float(m.group(1))
                    restore_line = line.strip()
                m = re.match(r"changelog records:\s+(\d+)", line)
                if m:
                    restore_records = int(m.group(1))
    except FileNotFoundError:
        pass

    lines = []
    out = lines.append
    share = lambda every: f"{100 / every:g}%" if every else "none"
    out(
        f"{results['records']:,} events per peer ({share(results.get('poison_every'))} not JSON, "
        f"{share(results.get('failure_every'))} tool failures), "
        f"{results['partitions']} partitions, commit every {results['commit_interval_ms']} ms, "
        f"exactly-once, one broker; mode `{mode}`."
    )
    out("")
    out("| peer | events/s | records written / input | CPU µs / event | peak RSS MiB | p50 ms @ ½ peak | p99 ms @ ½ peak |")
    out("|---|---:|---:|---:|---:|---:|---:|")
    for key in ORDER:
        if key not in peers:
            continue
        p = peers[key]
        h = half_peak(p)
        name = NAMES[key]
        if key == "lk":
            name = f"Lk passthrough x{p['records_per_input']:.0f}"
        out(
            f"| {name} | {fmt(p.get('events_per_s'))} | {fmt(p.get('records_per_input'), 2)} | "
            f"{fmt(p.get('cpu_us_per_event'), 1)} | {fmt(p.get('rss_mib'))} | "
            f"{fmt(h.get('p50_ms'), 1)} | {fmt(h.get('p99_ms'), 1)} |"
        )
    out("")
    loop = peers.get("loop")
    if loop:
        out(
            f"Closed loop (`loop`): baton on the whole vision-research workflow, a driver answering "
            f"every handover as its agent would (Avro, {share(results.get('poison_every'))} poison contexts, "
            f"{share(results.get('failure_every'))} failing screenshots): {fmt(loop.get('contexts'))} contexts, "
            f"{fmt(loop.get('finished'))} of {fmt(loop.get('expected_finishers'))} expected finished, "
            f"{fmt(loop.get('events_per_s'))} events/s ({fmt(loop.get('workflows_per_s'))} workflows/s), "
            f"{fmt(loop.get('records_per_input'), 2)} records written / input, "
            f"{fmt(loop.get('cpu_us_per_event'), 1)} CPU µs / event, peak RSS {fmt(loop.get('rss_mib'))} MiB, "
            f"hop latency (answer sent to next handover seen) p50 {fmt(loop.get('hop_p50_ms'), 1)} ms, "
            f"p99 {fmt(loop.get('hop_p99_ms'), 1)} ms."
        )
        out("")
    timers = peers.get("timers")
    if timers:
        out(
            f"Timers (`timers`): the first step of {fmt(timers.get('contexts'))} contexts without timers "
            f"{fmt(timers.get('events_per_s_without'))} events/s ({fmt(timers.get('cpu_us_per_event_without'), 1)} CPU µs / event), "
            f"with a deadline and a step timeout per context {fmt(timers.get('events_per_s_with'))} events/s "
            f"({fmt(timers.get('cpu_us_per_event_with'), 1)} CPU µs / event; ratio {fmt(timers.get('cost_ratio'), 2)}); "
            f"{fmt(timers.get('timers_pending_after_inputs'))} timers pending after the inputs; "
            f"when the step timers came due together, lateness p50 {fmt(timers.get('lateness_p50_ms'), 1)} ms, "
            f"p99 {fmt(timers.get('lateness_p99_ms'), 1)} ms."
        )
        out("")
    if restore is not None:
        out(f"Restore (`cargo bench --bench restore`, {restore_records:,} changelog records): {restore_line}")
        out("")

    b = peers.get("baton", {})
    rate = lambda k: peers.get(k, {}).get("events_per_s")
    cpu = lambda k: peers.get(k, {}).get("cpu_us_per_event")
    r_l1, r_lk, r_q = ratio(rate("baton"), rate("l1")), ratio(rate("baton"), rate("lk")), ratio(rate("baton"), rate("quix"))
    c_q, c_l1 = ratio(cpu("baton"), cpu("quix")), ratio(cpu("baton"), cpu("l1"))
    p99 = half_peak(b).get("p99_ms") if b else None
    rss_1m = b.get("rss_mib_contexts")
    contexts = b.get("rss_contexts")

    def verdict(value, ok):
        if value is None:
            return "not measured"
        return "met" if ok(value) else "MISSED"

    out("| target | measured | verdict |")
    out("|---|---:|---|")
    targets = [
        ("baton / L1 events/s ≥ 0.5", r_l1, lambda v: v >= 0.5, 2),
        ("baton / Lk events/s ≥ 0.9", r_lk, lambda v: v >= 0.9, 2),
        ("baton / Quix events/s ≥ 2", r_q, lambda v: v >= 2.0, 2),
        ("baton CPU/event ≤ 0.25 × Quix", c_q, lambda v: v <= 0.25, 2),
        ("baton CPU/event ≤ 2 × L1", c_l1, lambda v: v <= 2.0, 2),
        ("baton p99 at ½ peak ≤ 250 ms", p99, lambda v: v <= 250.0, 1),
        ("restore ≥ 300,000 records/s", restore, lambda v: v >= 300_000, 0),
        (
            f"baton peak RSS ≤ 300 MiB with 1,000,000 contexts"
            + (f" (measured with {contexts:,})" if contexts else " (--full only)"),
            rss_1m,
            lambda v: v <= 300.0 and (contexts or 0) >= 1_000_000,
            0,
        ),
    ]
    for name, value, ok, digits in targets:
        out(f"| {name} | {fmt(value, digits)} | {verdict(value, ok)} |")
    out("")
    out("Offered load (paced producer, fraction of the peer's own peak) against what came out:")
    out("")
    out("| peer | fraction | offered events/s | achieved events/s | seen / sent | p50 ms | p99 ms |")
    out("|---|---:|---:|---:|---:|---:|---:|")
    for key in ORDER:
        for point in peers.get(key, {}).get("loads") or []:
            out(
                f"| {key} | {point.get('fraction')} | {fmt(point.get('offered_per_s'))} | "
                f"{fmt(point.get('achieved_per_s'))} | {point.get('seen')} / {point.get('sent')} | "
                f"{fmt(point.get('p50_ms'), 1)} | {fmt(point.get('p99_ms'), 1)} |"
            )
    text = "\n".join(lines)
    print(text)
    with open(table_path, "w") as f:
        f.write(text + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in ORDER:
        loads = peers.get(key, {}).get("loads") or []
        if not loads:
            continue
        xs = [p["offered_per_s"] for p in loads]
        label = NAMES[key]
        ax1.plot(xs, [p["achieved_per_s"] for p in loads], marker="o", label=label)
        ax2.plot(xs, [p["p99_ms"] if p.get("p99_ms") is not None else float("nan") for p in loads], marker="o", label=label)
        peak = peers[key].get("events_per_s")
        if peak:
            ax1.axhline(peak, linestyle=":", linewidth=0.8, color=ax1.lines[-1].get_color())
    ax1.set_xlabel("offered load (events/s)")
    ax1.set_ylabel("achieved (events/s); dotted: preloaded peak")
    ax1.set_title("throughput against offered load")
    ax2.set_xlabel("offered load (events/s)")
    ax2.set_ylabel("p99 end-to-end latency (ms)")
    ax2.set_yscale("log")
    ax2.axhline(250, linestyle="--", color="grey", linewidth=0.8)
    ax2.set_title("p99 latency against offered load")
    ax1.legend(fontsize=8)
    fig.suptitle(f"{results['records']:,} events of ~1 KB, {results['partitions']} partitions, EOS, commit 100 ms ({mode})", fontsize=9)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=110)
    print(f"\nplot: {plot_path}")


if __name__ == "__main__":
    main()
