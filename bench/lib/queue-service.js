// A queue sink for `workerd serve`: workerd's queue binding delivers each send
// to the service it is bound to as an HTTP request; this one accepts and counts
// them (the consumer side is not part of the hot path being measured).
let received = 0;

export default {
  async fetch(request) {
    await request.arrayBuffer();
    received++;
    return Response.json({ metadata: { metrics: { backlogCount: received, backlogBytes: 0, oldestMessageTimestamp: 0 } } });
  },
};
