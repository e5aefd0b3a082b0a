// The Lambda-style handler: the Nest app wrapped by @vendia/serverless-express,
// bootstrapped on the first invocation and reused by the following ones.
import serverlessExpress from "@vendia/serverless-express";
import { createApp } from "./app";

type Handler = (event: unknown, context: unknown) => Promise<unknown>;
let server: Promise<Handler> | undefined;

async function bootstrap(): Promise<Handler> {
  const app = await createApp();
  await app.init();
  return serverlessExpress({ app: app.getHttpAdapter().getInstance() }) as unknown as Handler;
}

export const handler: Handler = async (event, context) => {
  server ??= bootstrap();
  return (await server)(event, context);
};
