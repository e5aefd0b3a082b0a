// The Nest application, shared by the long-running server (main.ts) and the
// Lambda-style handler (lambda.ts).
import "reflect-metadata";
import { ArgumentsHost, Catch, ExceptionFilter, HttpException, INestApplication, Module } from "@nestjs/common";
import { NestFactory } from "@nestjs/core";
import type { NestExpressApplication } from "@nestjs/platform-express";
import type { NextFunction, Request, Response } from "express";
import { randomBytes } from "node:crypto";
import * as core from "../../shared/core";
import { ConnectController, HealthController } from "./connect.controller";
import { Keys } from "./keys";
import { ConnectionEvents, MemoryKv, RegionGates } from "./state";

@Module({ controllers: [HealthController, ConnectController], providers: [MemoryKv, Keys, RegionGates, ConnectionEvents] })
export class AppModule {}

/** Problems (and Nest's own HTTP errors) as problem+json. */
@Catch()
class ProblemFilter implements ExceptionFilter {
  catch(err: unknown, host: ArgumentsHost) {
    const res = host.switchToHttp().getResponse<Response>();
    let p: core.Problem;
    if (err instanceof core.Problem) p = err;
    else if (err instanceof HttpException && err.getStatus() === 413)
      p = new core.Problem(413, "payload_too_large", "Payload Too Large", `The body is larger than ${core.MAX_JSON_BODY} bytes.`, { max_bytes: core.MAX_JSON_BODY });
    else if (err instanceof HttpException && err.getStatus() === 404) p = new core.Problem(404, "not_found", "Not Found", "No such route.");
    else if (err instanceof HttpException && err.getStatus() === 400) p = new core.Problem(400, "malformed_json", "Bad Request", "The body is not valid JSON.");
    else {
      console.error(JSON.stringify({ level: "error", msg: String(err) }));
      p = new core.Problem(500, "internal_error", "Internal Server Error", "Something went wrong; it has been logged.");
    }
    res.status(p.status).set(p.headers()).type("application/problem+json").send(JSON.stringify(p.body(res.locals.requestId)));
  }
}

/** Request id, the headers every response carries, one log line per request. */
function everyResponse(req: Request, res: Response, next: NextFunction) {
  const started = Date.now();
  const id = core.requestId(req.get("cf-ray"), randomBytes(16));
  res.locals.requestId = id;
  res.setHeader("x-request-id", id);
  res.setHeader("cache-control", "no-store");
  for (const [k, v] of core.SECURITY_HEADERS) res.setHeader(k, v);
  res.on("finish", () => core.logRequest(id, req.method, req.path, res.statusCode, Date.now() - started));
  next();
}

export async function createApp(): Promise<INestApplication> {
  const app = await NestFactory.create<NestExpressApplication>(AppModule, {
    logger: ["error", "warn"],
    bodyParser: false,
  });
  app.set("etag", false);
  app.disable("x-powered-by");
  app.use(everyResponse);
  app.useBodyParser("json", { limit: core.MAX_JSON_BODY });
  app.useGlobalFilters(new ProblemFilter());
  return app;
}
