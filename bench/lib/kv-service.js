// An in-memory Workers KV store for `workerd serve`, shared by every worker in
// the benchmark. workerd's kvNamespace binding speaks HTTP to the service it is
// bound to: GET/PUT/DELETE https://<host>/<url-encoded key>?urlencoded=true, 404 for
// a missing key; list is GET /?prefix=... . Seeded from the scenario's kv.json.
import seed from "seed.json";

const store = new Map(Object.entries(seed));

export default {
  async fetch(request) {
    const url = new URL(request.url);
    const key = decodeURIComponent(url.pathname.slice(1));
    switch (request.method) {
      case "GET": {
        if (key === "") {
          const prefix = url.searchParams.get("prefix") ?? "";
          const keys = [...store.keys()].filter((k) => k.startsWith(prefix)).sort().map((name) => ({ name }));
          return Response.json({ keys, list_complete: true, cacheStatus: null });
        }
        const value = store.get(key);
        return value === undefined ? new Response(null, { status: 404 }) : new Response(value);
      }
      case "PUT":
        store.set(key, await request.text());
        return new Response(null, { status: 200 });
      case "DELETE":
        store.delete(key);
        return new Response(null, { status: 200 });
      default:
        return new Response(null, { status: 405 });
    }
  },
};
