//! The request and response at the runtime's boundary, with as few calls into
//! JavaScript as the work needs.
//!
//! workers-rs's `worker::Request` reads the method, the URL, the headers object
//! and the `cf` object of every request as it is built; `cf` alone is an object
//! the runtime builds for each access (about 18 us in the V8 profile), and only
//! a connect outside local development uses it. [`Incoming`] holds the
//! runtime's request and reads each part when a handler asks for it.
//!
//! On the way out, `worker::Response` costs a `Headers` object, one call per
//! header (eight on every answer), a `ResponseInit` and a copy of the body;
//! [`respond`] hands the status, the headers and the body to one JavaScript
//! function, which builds the `Response` in one go.

use wasm_bindgen::prelude::*;
use worker::worker_sys::ext::RequestExt as _;
use worker::worker_sys::web_sys;

use crate::http::Reply;

/// A request as the runtime handed it over.
pub struct Incoming {
    raw: web_sys::Request,
    /// Fetched once: each `raw.headers()` is a call into JavaScript.
    headers: web_sys::Headers,
    body_used: bool,
}

impl Incoming {
    pub fn new(raw: web_sys::Request) -> Incoming {
        Incoming {
            headers: raw.headers(),
            raw,
            body_used: false,
        }
    }

    /// The method as sent (`worker::Method` would turn methods it does not
    /// know, e.g. QUERY, into GET).
    pub fn method(&self) -> String {
        self.raw.method()
    }

    /// The URL's path, still percent-encoded.
    pub fn path(&self) -> String {
        crate::http::path_of_url(&self.raw.url()).to_owned()
    }

    /// One header's value; `None` when absent (or unreadable).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).ok().flatten()
    }

    /// Cloudflare's properties of the request (geolocation and more); `None`
    /// in local development.
    pub fn cf(&self) -> Option<worker::Cf> {
        self.raw.cf().map(Into::into)
    }

    /// The whole body. A second call is an error: a body is read once.
    pub async fn bytes(&mut self) -> worker::Result<Vec<u8>> {
        if self.body_used {
            return Err(worker::Error::BodyUsed);
        }
        self.body_used = true;
        let buffer = super::promise::settled(&self.raw.array_buffer()?)
            .await
            .map_err(|e| {
                worker::Error::JsError(
                    e.as_string()
                        .unwrap_or_else(|| "the request body could not be read".into()),
                )
            })?;
        Ok(js_sys::Uint8Array::new(&buffer).to_vec())
    }
}

#[wasm_bindgen(inline_js = r#"
export function respond(body, status, head) {
  // `body` is a view of wasm memory: copied before the call returns.
  const response = new Response(body.length === 0 ? null : body.slice(), { status });
  const headers = response.headers;
  const parts = head.split("\0");
  for (let i = 0; i + 1 < parts.length; i += 2) headers.append(parts[i], parts[i + 1]);
  return response;
}
"#)]
extern "C" {
    #[wasm_bindgen(catch, js_name = respond)]
    fn respond_js(body: &[u8], status: u16, head: &str) -> Result<web_sys::Response, JsValue>;
}

/// The headers as `name NUL value NUL ...`: NUL is the one separator that can
/// appear in neither (the Fetch standard forbids it in values, and names are
/// tokens). `None` if one does contain it.
fn head(headers: &[(&'static str, String)]) -> Option<String> {
    let mut out = String::with_capacity(headers.iter().map(|(n, v)| n.len() + v.len() + 2).sum());
    for (name, value) in headers {
        if name.contains('\0') || value.contains('\0') {
            return None;
        }
        out.push_str(name);
        out.push('\0');
        out.push_str(value);
        out.push('\0');
    }
    Some(out)
}

/// The runtime's `Response` for a reply; an error for a header the platform
/// refuses (the caller answers 500 then).
pub fn respond(reply: &Reply) -> worker::Result<web_sys::Response> {
    let head = head(&reply.headers)
        .ok_or_else(|| worker::Error::RustError("a response header contains NUL".into()))?;
    respond_js(&reply.body, reply.status, &head)
        .map_err(|e| worker::Error::JsError(e.as_string().unwrap_or_else(|| format!("{e:?}"))))
}
