// The state the hot path reads, held in memory (this stack has no KV, Durable
// Objects or Queues): KV values as the strings the worker stores, parsed per
// read like a KV get; admission buckets per gate; connection events in a queue.
import { Injectable } from "@nestjs/common";
import { readFileSync } from "node:fs";
import * as core from "../../shared/core";

@Injectable()
export class MemoryKv {
  private readonly values: Map<string, string>;

  constructor() {
    const file = process.env.BENCH_KV_FILE;
    this.values = new Map(file ? Object.entries(JSON.parse(readFileSync(file, "utf8"))) : []);
  }

  getJson<T>(key: string): T | null {
    const v = this.values.get(key);
    return v === undefined ? null : (JSON.parse(v) as T);
  }

  getText(key: string): string | null {
    return this.values.get(key) ?? null;
  }
}

@Injectable()
export class RegionGates {
  private readonly buckets = new Map<string, core.Bucket>();

  admit(gate: string, rate: number): core.Verdict {
    let b = this.buckets.get(gate);
    if (!b) {
      b = new core.Bucket();
      this.buckets.set(gate, b);
    }
    return b.take(rate, Date.now());
  }
}

/** Connection events, delivered in batches of up to 100 (the consumer is not part of the benchmark). */
@Injectable()
export class ConnectionEvents {
  private batch: core.ConnectionEvent[] = [];
  delivered = 0;

  send(e: core.ConnectionEvent) {
    this.batch.push(e);
    if (this.batch.length >= 100) {
      this.delivered += this.batch.length;
      this.batch = [];
    }
  }
}
