//! The cron trigger republishes the region catalogue from PostgreSQL to KV.

use crate::harness::{Ctx, Test};
use crate::support::DB_NAME;
use libtest_mimic::Failed;
use serde_json::Value;

pub const TESTS: &[(&str, Test)] = &[(
    "cron::the_cron_publishes_the_catalogue_to_kv_and_follows_changes",
    publishes_catalogue,
)];

async fn trigger(ctx: &Ctx) -> Result<(), Failed> {
    let resp = ctx
        .http
        .get(ctx.url("/__scheduled?cron=*+*+*+*+*"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200, "scheduled handler ran");
    Ok(())
}

fn snapshot(ctx: &Ctx) -> Value {
    let raw = ctx
        .stack()
        .wrangler
        .kv_get("catalogue/v1")
        .expect("catalogue/v1 in KV");
    serde_json::from_str(&raw).expect("snapshot is JSON")
}

fn publishes_catalogue(ctx: &Ctx) -> Result<(), Failed> {
    let db_url = ctx.stack().pg.url(DB_NAME);
    ctx.rt.block_on(async {
        // Changes region health: no test that depends on it may run meanwhile.
        let _write = ctx.regions.write().await;
        let db = keenvpn_edge::db::connect(&db_url).await?;
        trigger(ctx).await?;
        let snap = snapshot(ctx);
        let regions = snap["regions"].as_array().expect("regions");
        let in_db: i64 = db
            .query_one("SELECT count(*) FROM regions", &[])
            .await?
            .get(0);
        assert_eq!(regions.len() as i64, in_db);
        let ids: Vec<&str> = regions.iter().map(|r| r["id"].as_str().unwrap()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "regions sorted by id");
        for r in regions {
            assert!(r["servers"].as_array().unwrap().len() >= 2, "{r}");
            assert!(r["latitude"].is_f64() && r["longitude"].is_f64());
        }
        let etag = snap["etag"].as_str().unwrap().to_owned();
        assert_eq!(etag.len(), 16);

        // A change in PostgreSQL reaches KV at the next run. (Locally Hyperdrive
        // does not cache, so the next run sees it at once; deployed, the cached
        // binding may lag by up to its cache TTL.)
        db.execute(
            "UPDATE regions SET health = 'draining' WHERE id = 'eu-west'",
            &[],
        )
        .await?;
        trigger(ctx).await?;
        let changed = snapshot(ctx);
        db.execute("UPDATE regions SET health = 'up' WHERE id = 'eu-west'", &[])
            .await?;
        // Publish the restored state, as the next minute's run would.
        trigger(ctx).await?;
        assert_ne!(changed["etag"], etag.as_str());
        let eu_west = changed["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "eu-west")
            .unwrap();
        assert_eq!(eu_west["health"], "draining");
        Ok(())
    })
}
