#!/usr/bin/env python3
"""PyTorch gloo all_reduce over the same size sweep and columns as `allreduce-perf`.

The baseline that longhaul's QUIC ring is measured against: torch.distributed with the gloo
backend (TCP, CPU tensors). Run it

  * on loopback, launching the ranks itself:   gloo_allreduce.py --launch 4 -b 1M -e 64M -f 4
  * one process per rank (for example under the WAN lab), from the usual environment variables
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT:  gloo_allreduce.py -b 1M -e 256M

Rank 0 prints the table (or JSON with --json). Busbw follows nccl-tests: algbw = S/t,
busbw = algbw * 2(N-1)/N. The kernel's TCP settings, which bound what gloo can do on a long
path, are printed with the results.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time


def parse_size(text):
    text = text.strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in mult:
        return int(text[:-1]) * mult[text[-1].upper()]
    return int(text)


def sizes(args):
    out, s = [], max(args.minbytes, 4)
    while s <= args.maxbytes:
        out.append(s // 4 * 4)
        if args.stepfactor <= 1:
            break
        s *= args.stepfactor
    return out


def tcp_settings():
    """The kernel TCP settings gloo runs with (they cap its window on long paths)."""
    keys = {
        "wmem_max": "/proc/sys/net/core/wmem_max",
        "rmem_max": "/proc/sys/net/core/rmem_max",
        "tcp_wmem": "/proc/sys/net/ipv4/tcp_wmem",
        "tcp_rmem": "/proc/sys/net/ipv4/tcp_rmem",
        "congestion_control": "/proc/sys/net/ipv4/tcp_congestion_control",
    }
    out = {}
    for k, path in keys.items():
        try:
            with open(path) as f:
                out[k] = f.read().strip()
        except OSError as e:
            out[k] = f"unreadable: {e}"
    return out


def inputs(torch, rank, count):
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.rand(count, generator=g, dtype=torch.float32) * 2 - 1


def run_rank(rank, world, args):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for nbytes in sizes(args):
        count = nbytes // 4
        data = inputs(torch, rank, count)
        buf = data.clone()
        times = []
        for i in range(args.warmup_iters + args.iters):
            buf.copy_(data)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t = time.perf_counter() - t0
            if i >= args.warmup_iters:
                times.append(t)
        want = sum(inputs(torch, r, count).double() for r in range(world))
        err = (buf.double() - want).abs()
        max_err = float(err.max()) if count else 0.0
        norm = float(want.norm()) if count else 0.0
        rel = float((buf.double() - want).norm()) / norm if norm > 0 else 0.0
        mean = statistics.fmean(times)
        ordered = sorted(times)
        algbw = nbytes / mean / 1e9 if mean > 0 else 0.0
        rows.append({
            "bytes": nbytes,
            "count": count,
            "time_us": mean * 1e6,
            "algbw_gbps": algbw,
            "busbw_gbps": algbw * 2 * (world - 1) / world,
            "p50_us": ordered[len(ordered) // 2] * 1e6,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
            "max_err": max_err,
            "rel_err": rel,
        })
    dist.destroy_process_group()
    if rank == 0:
        report(world, args, rows)


def report(world, args, rows):
    if args.json:
        print(json.dumps({"system": "gloo", "ranks": world, "tcp": tcp_settings(), "results": rows}, indent=2))
        return
    tcp = tcp_settings()
    print(f"# gloo all_reduce (torch.distributed, TCP): {world} ranks")
    print("#   " + ", ".join(f"{k}={v}" for k, v in tcp.items()))
    print("#{:>12} {:>11} {:>8} {:>6} {:>6} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}".format(
        "size", "count", "type", "redop", "compr", "time(us)", "algbw", "busbw", "p50(us)", "p99(us)", "maxerr", "relerr"))
    print("#{:>12} {:>11} {:>8} {:>6} {:>6} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}".format(
        "(B)", "(elements)", "", "", "", "", "(GB/s)", "(GB/s)", "", "", "", ""))
    for r in rows:
        print(" {:>12} {:>11} {:>8} {:>6} {:>6} {:>11.1f} {:>10.4f} {:>10.4f} {:>10.0f} {:>10.0f} {:>9.2e} {:>9.2e}".format(
            r["bytes"], r["count"], "float", "sum", "none", r["time_us"], r["algbw_gbps"], r["busbw_gbps"],
            r["p50_us"], r["p99_us"], r["max_err"], r["rel_err"]))
    if rows:
        r = rows[-1]
        print(f"# busbw at {r['bytes']} B: {r['busbw_gbps']:.4f} GB/s = {r['busbw_gbps'] * 8:.3f} Gbit/s")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("1M"))
    p.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size("64M"))
    p.add_argument("-f", "--stepfactor", type=int, default=4)
    p.add_argument("-n", "--iters", type=int, default=5)
    p.add_argument("-w", "--warmup_iters", type=int, default=1)
    p.add_argument("--launch", type=int, help="start this many ranks on loopback")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.minbytes > args.maxbytes or args.iters < 1:
        p.error("need --minbytes <= --maxbytes and --iters >= 1")

    if args.launch:
        import torch.multiprocessing as mp

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        mp.start_processes(run_rank, args=(args.launch, args), nprocs=args.launch, start_method="spawn")
        return
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError as e:
        p.error(f"{e.args[0]} is not set: use --launch N, or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
    run_rank(rank, world, args)


if __name__ == "__main__":
    sys.exit(main())
