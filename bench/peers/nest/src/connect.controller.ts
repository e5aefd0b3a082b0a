// GET /v1/regions and POST /v1/connect: the same rules as the worker's
// src/edge/connect.rs (see ../../shared/core.ts).
import { Controller, Get, Post, Req, Res } from "@nestjs/common";
import type { Request, Response } from "express";
import { randomBytes, randomInt } from "node:crypto";
import * as core from "../../shared/core";
import { Keys } from "./keys";
import { ConnectionEvents, MemoryKv, RegionGates } from "./state";

const nowSecs = () => Math.floor(Date.now() / 1000);

/** Liveness, no I/O: the floor of what a request costs in this stack. */
@Controller()
export class HealthController {
  @Get("healthz")
  healthz(@Res() res: Response) {
    res.status(200).type("application/json").send('{"status":"ok"}');
  }
}

@Controller("v1")
export class ConnectController {
  private catalogue?: { snapshot: core.Snapshot; at: number };
  private readonly dev = process.env.ENVIRONMENT === "development";

  constructor(
    private readonly kv: MemoryKv,
    private readonly keys: Keys,
    private readonly gates: RegionGates,
    private readonly events: ConnectionEvents,
  ) {}

  /** The catalogue, parsed at most once every few seconds, and then only when its etag changed. */
  private snapshot(): core.Snapshot {
    const now = Date.now();
    if (this.catalogue && now - this.catalogue.at < core.CATALOGUE_TTL_MS) return this.catalogue.snapshot;
    if (this.catalogue && this.kv.getText(core.CATALOGUE_ETAG_KEY) === this.catalogue.snapshot.etag) {
      this.catalogue.at = now;
      return this.catalogue.snapshot;
    }
    const s = this.kv.getJson<core.Snapshot>(core.CATALOGUE_KEY);
    if (!s) throw new core.Problem(503, "service_unavailable", "Service Unavailable", "No catalogue.");
    this.catalogue = { snapshot: s, at: now };
    return s;
  }

  @Get("regions")
  regions(@Req() req: Request, @Res() res: Response) {
    const s = this.snapshot();
    const etag = `"${s.etag}"`;
    res.set({ etag, "cache-control": "public, max-age=15" });
    if (core.notModified(req.get("if-none-match"), etag)) {
      res.status(304).end();
      return;
    }
    res.status(200).type("application/json").send(core.regionsBody(s));
  }

  private authenticate(req: Request): core.AccessClaims {
    const claims = this.keys.verify(core.bearer(req.get("authorization")), nowSecs());
    const mirror = this.kv.getJson(`sessions/${claims.sub}`);
    if (core.sessionRevoked(mirror, claims.sid))
      throw new core.Problem(401, "session_revoked", "Unauthorized", "This session has been signed out.");
    return claims;
  }

  private event(sub: string, device: string, region: string, server: string | null, outcome: core.ConnectionEvent["outcome"]) {
    this.events.send({
      event_id: core.uuidV4(randomBytes(16)),
      occurred_at_ms: Date.now(),
      user_id: sub,
      device_id: device,
      region_id: region,
      server_id: server,
      outcome,
    });
  }

  @Post("connect")
  connect(@Req() req: Request, @Res() res: Response) {
    const claims = this.authenticate(req);
    const location = core.clientLocation(this.dev, (n) => req.get(n));
    const body = core.connectBodyFrom(req.get("content-type"), req.body);
    if (!core.isDeviceId(body.device_id)) throw core.deviceNotFound();
    const devices = this.kv.getJson<{ devices: core.Device[] }>(`devices/${claims.sub}`)?.devices ?? [];
    const p = core.placeConnect(claims, body, devices, this.snapshot(), location);
    const region = p.choice.region;

    const verdict = this.gates.admit(p.gate, p.rate);
    const refused = core.refusal(verdict, p.choice.failover, randomInt(2 ** 32 - 1));
    if (refused) {
      this.event(claims.sub, p.device.id, region.id, null, verdict.outcome === "wait" ? "throttled" : "closed");
      throw refused;
    }
    const server = core.chooseServer(region, p.device.id);
    if (!server)
      throw new core.Problem(503, "region_closed", "Service Unavailable", "The region has no server available.", { failover: p.choice.failover }, 5);
    const ticket = this.keys.sign(core.ticketClaims(claims.sub, p.device, server, region, nowSecs()));
    res.status(200).type("application/json").send(core.connectBody(region, server, p.device, ticket, p.choice.failover));
    this.event(claims.sub, p.device.id, region.id, server.id, "admitted");
  }
}
