// The long-running server: node main.js (PORT, default 3000).
import { createApp } from "./app";

createApp().then((app) => app.listen(Number(process.env.PORT ?? 3000), "127.0.0.1"));
