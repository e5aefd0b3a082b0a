//! `stripe-sign`: signs a webhook body the way Stripe does, so a developer can
//! replay realistic events against a local Worker without a Stripe account or
//! the Stripe CLI.
//!
//! ```text
//! # a realistic event (printed as JSON)
//! stripe-sign --example customer.subscription.created --customer cus_123 \
//!     --user 0b0e7a4e-2f3c-4d5e-8f90-123456789abc --plan plus
//! # ... signed and ready to post
//! stripe-sign --secret whsec_dev --example invoice.paid --customer cus_123 \
//!     --user 0b0e7a4e-2f3c-4d5e-8f90-123456789abc --plan plus \
//!     --curl http://localhost:8787/v1/webhooks/stripe | sh
//! # the header for a body saved earlier (the file's exact bytes are signed)
//! stripe-sign --secret whsec_dev --event-file event.json
//! ```
//!
//! Signing and the example events come from `keenvpn_edge::domain::stripe`,
//! the same code the Worker verifies with, so what this prints is exactly what
//! the Worker accepts. The tool only adds the clock (the default timestamp)
//! and a unique default event id, which the pure core must not have.

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
mod cli {
    use std::io::Read as _;
    use std::process::ExitCode;
    use std::time::{SystemTime, UNIX_EPOCH};

    use keenvpn_edge::domain::entitlement::Status;
    use keenvpn_edge::domain::stripe::{self, Example, RELEVANT_KINDS};

    const USAGE: &str = "\
usage: stripe-sign [--secret whsec_...] [--timestamp N]
                   (--event-file F | --event-json JSON | --example KIND EXAMPLE-OPTIONS)
                   [--print-header | --curl URL]

Signs a Stripe webhook body and prints the Stripe-Signature header value
(--print-header, the default) or a complete curl command that posts the body
(--curl URL). With --example and neither of those, prints the example event.

  --secret S         the endpoint secret (default: $STRIPE_WEBHOOK_SECRET)
  --timestamp N      the signature's unix timestamp (default: now)
  --event-file F     sign F's exact bytes (- reads standard input)
  --event-json JSON  sign this JSON text as given
  --print-header     print only the Stripe-Signature value
  --curl URL         print a curl command that posts the signed body to URL

  --example KIND     build a realistic event of KIND, one of:
                       customer.subscription.created, customer.subscription.updated,
                       customer.subscription.deleted, invoice.paid, invoice.payment_failed
    --customer ID      Stripe customer id, e.g. cus_123 (required)
    --user UUID        our user id, put in the subscription's metadata (required)
    --plan ID          plan id / price lookup key, e.g. plus (required)
    --status S         subscription status (default: active)
    --period-end N     current period end, unix seconds (default: created + 30 days)
    --cancel-at-period-end
                       mark the subscription as ending with its period
    --subscription ID  subscription id (default: derived from the customer id)
    --event-id ID      event id (default: a fresh evt_local_... per run)
    --created N        event creation time, unix seconds (default: the timestamp)";

    /// A bad command line: the message, then a pointer to the usage.
    struct Usage(String);

    fn usage(message: impl Into<String>) -> Usage {
        Usage(message.into())
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Source {
        File(String),
        Json(String),
        Example(String),
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Output {
        Header,
        Curl(String),
    }

    #[derive(Debug, Default, PartialEq, Eq)]
    struct Options {
        help: bool,
        secret: Option<String>,
        timestamp: Option<i64>,
        source: Option<Source>,
        output: Option<Output>,
        customer: Option<String>,
        user: Option<String>,
        plan: Option<String>,
        status: Option<String>,
        period_end: Option<i64>,
        cancel_at_period_end: bool,
        subscription: Option<String>,
        event_id: Option<String>,
        created: Option<i64>,
    }

    pub fn main() -> ExitCode {
        let options = match parse_args(std::env::args().skip(1)) {
            Ok(options) => options,
            Err(Usage(message)) => {
                eprintln!("stripe-sign: {message}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        if options.help {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        match run(options, std::env::var("STRIPE_WEBHOOK_SECRET").ok()) {
            Ok(output) => {
                println!("{output}");
                ExitCode::SUCCESS
            }
            Err(Failure::Usage(Usage(message))) => {
                eprintln!("stripe-sign: {message} (try --help)");
                ExitCode::from(2)
            }
            Err(Failure::Io(message)) => {
                eprintln!("stripe-sign: {message}");
                ExitCode::FAILURE
            }
        }
    }

    fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options, Usage> {
        let mut options = Options::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            // Accept both `--flag value` and `--flag=value`.
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value)),
                _ => (arg.clone(), None),
            };
            let mut value = || -> Result<String, Usage> {
                match inline {
                    Some(value) => Ok(value.to_owned()),
                    None => args
                        .next()
                        .ok_or_else(|| usage(format!("{flag} needs a value"))),
                }
            };
            match flag.as_str() {
                "-h" | "--help" => options.help = true,
                "--secret" => options.secret = Some(value()?),
                "--timestamp" => options.timestamp = Some(number(&flag, &value()?)?),
                "--event-file" => set_source(&mut options, Source::File(value()?))?,
                "--event-json" => set_source(&mut options, Source::Json(value()?))?,
                "--example" => set_source(&mut options, Source::Example(value()?))?,
                "--print-header" => set_output(&mut options, Output::Header)?,
                "--curl" => set_output(&mut options, Output::Curl(value()?))?,
                "--customer" => options.customer = Some(value()?),
                "--user" => options.user = Some(value()?),
                "--plan" => options.plan = Some(value()?),
                "--status" => options.status = Some(value()?),
                "--period-end" => options.period_end = Some(number(&flag, &value()?)?),
                "--cancel-at-period-end" => options.cancel_at_period_end = true,
                "--subscription" => options.subscription = Some(value()?),
                "--event-id" => options.event_id = Some(value()?),
                "--created" => options.created = Some(number(&flag, &value()?)?),
                other => return Err(usage(format!("unknown argument {other:?}"))),
            }
        }
        Ok(options)
    }

    fn set_source(options: &mut Options, source: Source) -> Result<(), Usage> {
        if options.source.is_some() {
            return Err(usage(
                "give one body: --event-file, --event-json or --example",
            ));
        }
        options.source = Some(source);
        Ok(())
    }

    fn set_output(options: &mut Options, output: Output) -> Result<(), Usage> {
        if options.output.is_some() {
            return Err(usage("give at most one of --print-header and --curl"));
        }
        options.output = Some(output);
        Ok(())
    }

    fn number(flag: &str, value: &str) -> Result<i64, Usage> {
        value
            .parse()
            .map_err(|_| usage(format!("{flag} takes unix seconds, not {value:?}")))
    }

    enum Failure {
        Usage(Usage),
        Io(String),
    }

    impl From<Usage> for Failure {
        fn from(usage: Usage) -> Failure {
            Failure::Usage(usage)
        }
    }

    /// Everything but the process boundary: returns what to print.
    fn run(options: Options, env_secret: Option<String>) -> Result<String, Failure> {
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let timestamp = options
            .timestamp
            .unwrap_or_else(|| i64::try_from(clock.as_secs()).unwrap_or(i64::MAX));

        let (body, is_example) = match &options.source {
            None => {
                return Err(usage("no body: give --event-file, --event-json or --example").into());
            }
            Some(Source::Json(json)) => (json.clone().into_bytes(), false),
            Some(Source::File(path)) => (read_body(path)?, false),
            Some(Source::Example(kind)) => {
                // Nanoseconds make the default event id unique per run, so a
                // replay is not dropped as a redelivery of the previous one.
                let fresh_id = format!("evt_local_{:x}", clock.as_nanos());
                (example_body(kind, &options, timestamp, &fresh_id)?, true)
            }
        };

        let output = match options.output {
            None if is_example => return Ok(String::from_utf8_lossy(&body).into_owned()),
            None => Output::Header,
            Some(output) => output,
        };

        let secret = options
            .secret
            .or(env_secret)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| usage("no secret: pass --secret or set STRIPE_WEBHOOK_SECRET"))?;
        if !secret.starts_with("whsec_") {
            eprintln!("stripe-sign: note: Stripe endpoint secrets start with whsec_");
        }
        // Signing a body the Worker cannot read is allowed (it is a way to
        // test that path), but say so, since it is usually a mistake.
        if let Err(error) = stripe::parse_event(&body) {
            eprintln!("stripe-sign: note: the Worker will refuse this body: {error}");
        }

        let header = stripe::sign(&secret, timestamp, &body);
        match output {
            Output::Header => Ok(header),
            Output::Curl(url) => Ok(curl_command(&url, &header, &body)?),
        }
    }

    fn read_body(path: &str) -> Result<Vec<u8>, Failure> {
        if path == "-" {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .map_err(|e| Failure::Io(format!("cannot read standard input: {e}")))?;
            return Ok(body);
        }
        std::fs::read(path).map_err(|e| Failure::Io(format!("cannot read {path}: {e}")))
    }

    fn example_body(
        kind: &str,
        options: &Options,
        timestamp: i64,
        fresh_id: &str,
    ) -> Result<Vec<u8>, Usage> {
        if !RELEVANT_KINDS.contains(&kind) {
            return Err(usage(format!(
                "--example takes one of {}, not {kind:?}",
                RELEVANT_KINDS.join(", ")
            )));
        }
        let customer_id = required(&options.customer, "--customer")?;
        let user_id = required(&options.user, "--user")?;
        let plan_id = required(&options.plan, "--plan")?;
        if !is_uuid(user_id) {
            return Err(usage(
                "--user must be a lowercase hyphenated UUID (our user ids are)",
            ));
        }
        let status = match options.status.as_deref() {
            None => Status::Active,
            Some(s) => Status::parse(s).ok_or_else(|| {
                usage(format!(
                    "--status takes a Stripe subscription status \
                     (active, trialing, past_due, canceled, unpaid, incomplete, \
                     incomplete_expired, paused), not {s:?}"
                ))
            })?,
        };
        let created = options.created.unwrap_or(timestamp);
        let current_period_end = options
            .period_end
            .unwrap_or_else(|| created.saturating_add(30 * 24 * 3600));
        // One customer, one subscription: deriving the id keeps a
        // created/updated/deleted sequence about the same subscription.
        let derived_subscription = format!(
            "sub_{}",
            customer_id.strip_prefix("cus_").unwrap_or(customer_id)
        );
        let example = Example {
            event_id: options.event_id.as_deref().unwrap_or(fresh_id),
            created,
            subscription_id: options
                .subscription
                .as_deref()
                .unwrap_or(&derived_subscription),
            customer_id,
            user_id,
            plan_id,
            status,
            current_period_end,
            cancel_at_period_end: options.cancel_at_period_end,
        };
        // Compact, so that what is printed is byte for byte what gets signed.
        Ok(stripe::example_event(kind, &example)
            .to_string()
            .into_bytes())
    }

    fn required<'a>(value: &'a Option<String>, flag: &str) -> Result<&'a str, Usage> {
        value
            .as_deref()
            .ok_or_else(|| usage(format!("--example needs {flag}")))
    }

    fn is_uuid(s: &str) -> bool {
        s.len() == 36
            && s.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
            })
    }

    /// A POSIX shell command line posting `body` as Stripe would.
    fn curl_command(url: &str, header: &str, body: &[u8]) -> Result<String, Usage> {
        let body = std::str::from_utf8(body)
            .ok()
            .filter(|b| !b.contains('\0'))
            .ok_or_else(|| {
                usage("the body is not text a shell can carry; use --print-header instead")
            })?;
        Ok(format!(
            "curl -sS -X POST {} -H {} -H {} -H {} --data-binary {}",
            shell_quote(url),
            shell_quote("Content-Type: application/json; charset=utf-8"),
            shell_quote("User-Agent: Stripe/1.0 (+https://stripe.com/docs/webhooks)"),
            shell_quote(&format!("Stripe-Signature: {header}")),
            shell_quote(body),
        ))
    }

    /// Single-quotes `s` for a POSIX shell: inside single quotes nothing is
    /// special except the quote itself, written as `'\''`.
    fn shell_quote(s: &str) -> String {
        format!("'{}'", s.replace('\'', r"'\''"))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const USER: &str = "0b0e7a4e-2f3c-4d5e-8f90-123456789abc";

        fn args(list: &[&str]) -> Result<Options, Usage> {
            parse_args(list.iter().map(|s| s.to_string()))
        }

        fn run_args(list: &[&str]) -> Result<String, Failure> {
            run(args(list).ok().unwrap(), None)
        }

        #[test]
        fn flags_take_their_value_separately_or_after_an_equals_sign() {
            let a = args(&[
                "--secret",
                "whsec_x",
                "--timestamp=42",
                "--event-json",
                "{}",
            ]);
            let a = a.ok().unwrap();
            assert_eq!(a.secret.as_deref(), Some("whsec_x"));
            assert_eq!(a.timestamp, Some(42));
            assert_eq!(a.source, Some(Source::Json("{}".into())));
        }

        #[test]
        fn bad_command_lines_are_refused() {
            for bad in [
                &["--nope"][..],
                &["--secret"],
                &["--timestamp", "soon"],
                &["--event-json", "{}", "--event-file", "f"],
                &["--print-header", "--curl", "http://x"],
            ] {
                assert!(args(bad).is_err(), "{bad:?}");
            }
            let missing_example_flags =
                run_args(&["--example", "invoice.paid", "--customer", "cus_1"]);
            assert!(matches!(missing_example_flags, Err(Failure::Usage(_))));
            let bad_kind = run_args(&[
                "--example",
                "charge.succeeded",
                "--customer",
                "cus_1",
                "--user",
                USER,
                "--plan",
                "plus",
            ]);
            assert!(matches!(bad_kind, Err(Failure::Usage(_))));
            let no_secret = run_args(&["--event-json", "{}"]);
            assert!(matches!(no_secret, Err(Failure::Usage(_))));
        }

        #[test]
        fn an_example_alone_prints_the_event_and_signing_it_prints_the_matching_header() {
            let common = [
                "--example",
                "customer.subscription.updated",
                "--customer",
                "cus_1",
                "--user",
                USER,
                "--plan",
                "plus",
                "--event-id",
                "evt_1",
                "--timestamp",
                "1700000000",
            ];
            let body = run_args(&common).ok().unwrap();
            assert!(matches!(
                stripe::parse_event(body.as_bytes()),
                Ok(stripe::Event::Relevant { .. })
            ));
            let header =
                run_args(&[&common[..], &["--secret", "whsec_x", "--print-header"]].concat())
                    .ok()
                    .unwrap();
            assert_eq!(
                stripe::verify(Some(&header), body.as_bytes(), &["whsec_x"], 1_700_000_000),
                Ok(())
            );
        }

        #[test]
        fn the_curl_command_quotes_the_body_and_carries_the_signature() {
            let command = curl_command("http://x/hook", "t=1,v1=ab", b"{\"a\":\"it's\"}")
                .ok()
                .unwrap();
            assert_eq!(
                command,
                "curl -sS -X POST 'http://x/hook' \
                 -H 'Content-Type: application/json; charset=utf-8' \
                 -H 'User-Agent: Stripe/1.0 (+https://stripe.com/docs/webhooks)' \
                 -H 'Stripe-Signature: t=1,v1=ab' \
                 --data-binary '{\"a\":\"it'\\''s\"}'"
            );
            assert!(curl_command("http://x", "t=1", b"\xff").is_err());
        }
    }
}
