//! The request and response at the runtime's boundary, with as few calls into
//! JavaScript as the work needs.
//!
//! workers-rs's `worker::Request` reads the method, the URL, the headers object
//! and the `cf` object of every request as it is built, each in a call of its
//! own; `cf` alone is an object the runtime builds for each access (about
//! 18 us in the V8 profile), and only a connect outside local development uses
//! it. [`Incoming`] reads the method, the URL and the headers the hot path
//! needs in one call, and anything else when a handler asks for it.
//!
//! On the way out, `worker::Response` costs a `Headers` object, one call per
//! header (eight on every answer), a `ResponseInit` and a copy of the body;
//! [`respond`] hands the status, the headers and the body to one JavaScript
//! function, which builds the `Response` in one go.

use wasm_bindgen::prelude::*;
use worker::wasm_bindgen_futures::JsFuture;
use worker::worker_sys::ext::RequestExt as _;
use worker::worker_sys::web_sys;

use crate::http::Reply;

/// The headers read on the hot path, fetched together with the method and the
/// URL in one call when the request arrives (`describe`): a header read
/// across the boundary costs a call, its name decoded and its value encoded,
/// and a connect reads all of these. Any other header is read when asked for.
const KNOWN: [&str; 6] = [
    "cf-ray",
    "authorization",
    "content-type",
    "content-length",
    "x-keenvpn-client-location",
    super::fault::HEADER,
];

#[wasm_bindgen(inline_js = r#"
export function describe(request, names) {
  // NUL can appear in none of these (a method is a token, the URL is
  // percent-encoded, and the Fetch standard forbids it in header values).
  const headers = request.headers;
  let out = request.method + "\0" + request.url + "\0";
  for (let i = 0; i < names.length; i++) {
    const value = headers.get(names[i]);
    out += value === null ? "\0" : "=" + value + "\0";
  }
  return out;
}
"#)]
extern "C" {
    fn describe(request: &web_sys::Request, names: &js_sys::Array) -> String;
}

thread_local! {
    /// [`KNOWN`] as a JavaScript array, made once per instance.
    static KNOWN_NAMES: js_sys::Array = KNOWN.iter().map(|n| JsValue::from_str(n)).collect();
}

/// A request as the runtime handed it over.
pub struct Incoming {
    raw: web_sys::Request,
    method: String,
    url: String,
    known: [Option<String>; KNOWN.len()],
    body_used: bool,
    request_id: String,
}

impl Incoming {
    pub fn new(raw: web_sys::Request) -> Incoming {
        let described = KNOWN_NAMES.with(|names| describe(&raw, names));
        let mut parts = described.split('\0');
        let method = parts.next().unwrap_or_default().to_owned();
        let url = parts.next().unwrap_or_default().to_owned();
        let known = std::array::from_fn(|_| {
            parts
                .next()
                .and_then(|v| v.strip_prefix('='))
                .map(str::to_owned)
        });
        let mut incoming = Incoming {
            raw,
            method,
            url,
            known,
            body_used: false,
            request_id: String::new(),
        };
        incoming.request_id = crate::domain::request_id::choose(
            incoming.header("cf-ray").as_deref(),
            super::random::bytes,
        );
        incoming
    }

    /// The id that the response's `x-request-id` and every log line about
    /// this request carry.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The method as sent (`worker::Method` would turn methods it does not
    /// know, e.g. QUERY, into GET).
    pub fn method(&self) -> String {
        self.method.clone()
    }

    /// The URL's path, still percent-encoded.
    pub fn path(&self) -> String {
        crate::http::path_of_url(&self.url).to_owned()
    }

    /// One header's value; `None` when absent (or unreadable). `name` is
    /// lowercase.
    pub fn header(&self, name: &str) -> Option<String> {
        match KNOWN.iter().position(|k| *k == name) {
            Some(i) => self.known[i].clone(),
            None => self.raw.headers().get(name).ok().flatten(),
        }
    }

    /// Cloudflare's properties of the request (geolocation and more); `None`
    /// in local development. The runtime's own object: `worker::Cf` would
    /// panic on a latitude or longitude that is not a number, and reads them
    /// as `f32`.
    pub fn cf(&self) -> Option<worker::worker_sys::IncomingRequestCfProperties> {
        self.raw.cf()
    }

    /// The whole body if it is at most `max` bytes, `None` if it is longer.
    /// A second call is an error: a body is read once.
    ///
    /// A body with a declared `Content-Length` (which the caller has checked
    /// against `max`) is framed by it and read in one go; one without
    /// (chunked) is read piece by piece and abandoned as soon as it passes
    /// `max`, so that no client can make the isolate hold more than that.
    pub async fn bytes(&mut self, max: usize) -> worker::Result<Option<Vec<u8>>> {
        if self.body_used {
            return Err(worker::Error::BodyUsed);
        }
        self.body_used = true;
        let unreadable = |e: JsValue| {
            worker::Error::JsError(
                e.as_string()
                    .unwrap_or_else(|| "the request body could not be read".into()),
            )
        };
        if self.header("content-length").is_some() {
            let buffer = JsFuture::from(self.raw.array_buffer()?)
                .await
                .map_err(unreadable)?;
            return Ok(Some(js_sys::Uint8Array::new(&buffer).to_vec()));
        }
        let read = JsFuture::from(read_at_most(&self.raw, max as f64))
            .await
            .map_err(unreadable)?;
        Ok((!read.is_null()).then(|| js_sys::Uint8Array::new(&read).to_vec()))
    }
}

#[wasm_bindgen(inline_js = r#"
export async function readAtMost(request, max) {
  const body = request.body;
  if (body === null) return new Uint8Array(0);
  const reader = body.getReader();
  const chunks = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > max) {
      await reader.cancel();
      return null;
    }
    chunks.push(value);
  }
  const out = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.byteLength;
  }
  return out;
}
"#)]
extern "C" {
    /// The body's bytes (a `Uint8Array`), or `null` once it passes `max`.
    #[wasm_bindgen(js_name = readAtMost)]
    fn read_at_most(request: &web_sys::Request, max: f64) -> js_sys::Promise;
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
