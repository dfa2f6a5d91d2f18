//! `wsbridge admin`: the admin API (README, "Admin API") as commands with readable tables
//! (or the API's JSON with `--json`), so that an operator can look at upstreams and webhooks,
//! list dead letters, replay and re-enable without hand-written requests.
//!
//! A replay of a seq range or of many ids is sent as several requests of `--chunk` events
//! each (the API takes at most 100,000 per request, and each runs inside the journal writer's
//! transaction), with a progress line on stderr after each one.

use std::io::Write;
use std::time::Duration;

use serde_json::{json, Value};
use wsbridge_adapters::Secret;

use super::{print_line, CliError, Target};

/// How long one admin request may take (a large replay chunk is one request).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest answer read from the bridge (10,000 dead letters with their attempts fit).
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// The most events the admin API replays per request (its own limit).
pub const MAX_CHUNK: u64 = 100_000;

/// `wsbridge admin`'s command line.
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The bridge's base URL (http or https).
    #[arg(long, env = "WSBRIDGE_URL", default_value = super::DEFAULT_URL, global = true)]
    pub url: String,
    /// The admin token (`server.admin_token`); sent as a bearer header, never printed.
    #[arg(
        long,
        env = "WSBRIDGE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    /// The command.
    pub command: AdminCommand,
}

/// One admin command.
#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Each upstream: provider, state and since when, events, reconnects, the last error.
    Upstreams,
    /// Each webhook endpoint: enabled, pending, in flight, dead, delivered, the last error.
    Webhooks,
    /// A webhook endpoint's dead letters with their attempts.
    DeadLetters {
        /// The webhook's name.
        name: String,
        /// At most this many (the API's ceiling is 10,000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Queue deliveries to a webhook again: its dead letters, events by id, or a seq range.
    Replay {
        /// The webhook's name.
        name: String,
        /// Every dead letter of the endpoint.
        #[arg(long, conflicts_with_all = ["ids", "from_seq", "to_seq"], required_unless_present_any = ["ids", "from_seq"])]
        dead: bool,
        /// These event ids (comma-separated).
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["from_seq", "to_seq"])]
        ids: Vec<String>,
        /// The first seq of the range (with --to-seq).
        #[arg(long, requires = "to_seq")]
        from_seq: Option<u64>,
        /// The last seq of the range, inclusive (with --from-seq).
        #[arg(long, requires = "from_seq")]
        to_seq: Option<u64>,
        /// Events (seqs or ids) per request; progress is shown after each.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=MAX_CHUNK))]
        chunk: u64,
    },
    /// Re-enable a webhook endpoint that a 410 disabled.
    Enable {
        /// The webhook's name.
        name: String,
    },
}

/// What a replay selects.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Selection {
    Dead,
    Ids(Vec<String>),
    Seqs { from: u64, to: u64 },
}

/// Runs one admin command; tables or JSON on `out`, replay progress on `progress`.
pub async fn run(
    args: AdminArgs,
    out: &mut impl Write,
    progress: &mut impl Write,
) -> Result<(), CliError> {
    let token = args.token.clone().ok_or_else(|| {
        CliError::Usage(
            "the admin token is needed: --token or WSBRIDGE_ADMIN_TOKEN (server.admin_token)"
                .to_string(),
        )
    })?;
    let api = Api::new(Target::new(&args.url, Secret::new(token))?)?;
    let lines = match args.command {
        AdminCommand::Upstreams => {
            let answer = api.call("GET", &["upstreams"], &[], None).await?;
            render(args.json, &answer, upstreams_table)
        }
        AdminCommand::Webhooks => {
            let answer = api.call("GET", &["webhooks"], &[], None).await?;
            render(args.json, &answer, webhooks_table)
        }
        AdminCommand::DeadLetters { name, limit } => {
            let limit = limit.to_string();
            let answer = api
                .call(
                    "GET",
                    &["webhooks", &name, "deliveries"],
                    &[("state", "dead"), ("limit", &limit)],
                    None,
                )
                .await?;
            render(args.json, &answer, dead_letters_table)
        }
        AdminCommand::Replay {
            name,
            dead,
            ids,
            from_seq,
            to_seq,
            chunk,
        } => {
            let selection = match (dead, from_seq, to_seq) {
                (true, _, _) => Selection::Dead,
                (false, Some(from), Some(to)) => Selection::Seqs { from, to },
                _ if !ids.is_empty() => Selection::Ids(ids),
                _ => {
                    return Err(CliError::Usage(
                        "replay needs --dead, --ids or --from-seq with --to-seq".to_string(),
                    ))
                }
            };
            let queued = replay(&api, &name, &selection, chunk, progress).await?;
            if args.json {
                vec![json!({"webhook": name, "queued": queued}).to_string()]
            } else {
                vec![format!("queued {queued} deliveries to {name}")]
            }
        }
        AdminCommand::Enable { name } => {
            let answer = api
                .call("POST", &["webhooks", &name, "enable"], &[], None)
                .await?;
            render(args.json, &answer, |_| {
                vec![format!("webhook {name} enabled")]
            })
        }
    };
    for line in lines {
        if !print_line(out, &line)? {
            break;
        }
    }
    Ok(())
}

/// The lines for an answer: its JSON with `--json`, else what `human` makes of it.
fn render(json: bool, answer: &Value, human: impl FnOnce(&Value) -> Vec<String>) -> Vec<String> {
    if json {
        vec![answer.to_string()]
    } else {
        human(answer)
    }
}

/// The replay requests of `selection`, `chunk` events each, a progress line after each; the
/// number of deliveries queued in all.
async fn replay(
    api: &Api,
    name: &str,
    selection: &Selection,
    chunk: u64,
    progress: &mut impl Write,
) -> Result<u64, CliError> {
    let path = ["webhooks", name, "replay"];
    let queued_of = |answer: &Value| {
        answer["queued"].as_u64().ok_or_else(|| {
            CliError::Protocol(format!("the replay answer has no queued count: {answer}"))
        })
    };
    // Progress is a courtesy: a closed stderr must not stop a replay half-way.
    let mut note = |line: String| {
        let _ = writeln!(progress, "{line}");
    };
    match selection {
        Selection::Dead => {
            let answer = api
                .call("POST", &path, &[], Some(json!({"dead": true})))
                .await?;
            queued_of(&answer)
        }
        Selection::Ids(ids) => {
            let size = usize::try_from(chunk).unwrap_or(usize::MAX);
            let mut queued: u64 = 0;
            let mut sent: usize = 0;
            for part in ids.chunks(size) {
                let answer = api
                    .call("POST", &path, &[], Some(json!({"ids": part})))
                    .await?;
                queued = queued.saturating_add(queued_of(&answer)?);
                sent = sent.saturating_add(part.len());
                note(format!(
                    "replay {name}: {sent} of {} ids sent, {queued} deliveries queued ({}%)",
                    ids.len(),
                    percent(sent as u128, ids.len() as u128)
                ));
            }
            Ok(queued)
        }
        Selection::Seqs { from, to } => {
            if from > to {
                return Err(CliError::Usage(format!(
                    "--from-seq {from} is after --to-seq {to}"
                )));
            }
            let total = u128::from(*to) - u128::from(*from) + 1;
            let mut queued: u64 = 0;
            for (start, end) in seq_chunks(*from, *to, chunk) {
                let answer = api
                    .call(
                        "POST",
                        &path,
                        &[],
                        Some(json!({"from_seq": start, "to_seq": end})),
                    )
                    .await?;
                queued = queued.saturating_add(queued_of(&answer)?);
                let done = u128::from(end) - u128::from(*from) + 1;
                note(format!(
                    "replay {name}: seqs {from}..={end} of {from}..={to} done, {queued} deliveries queued ({}%)",
                    percent(done, total)
                ));
            }
            Ok(queued)
        }
    }
}

/// `from..=to` cut into inclusive ranges of at most `chunk` seqs (`chunk` ≥ 1), without
/// overflowing at `u64::MAX`.
fn seq_chunks(from: u64, to: u64, chunk: u64) -> Vec<(u64, u64)> {
    let step = chunk.max(1) - 1;
    let mut out = Vec::new();
    let mut start = from;
    while start <= to {
        let end = start.saturating_add(step).min(to);
        out.push((start, end));
        match end.checked_add(1) {
            Some(next) if end < to => start = next,
            _ => break,
        }
    }
    out
}

fn percent(done: u128, total: u128) -> u128 {
    done.saturating_mul(100).checked_div(total).unwrap_or(100)
}

/// The admin API of one bridge.
struct Api {
    target: Target,
    client: reqwest::Client,
}

impl Api {
    fn new(target: Target) -> Result<Api, CliError> {
        crate::install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("wsbridge-cli/", env!("CARGO_PKG_VERSION")));
        if target.base.scheme() == "https" || target.base.scheme() == "wss" {
            builder = builder.tls_backend_preconfigured(super::tls_config(&[b"http/1.1"])?);
        }
        let client = builder
            .build()
            .map_err(|e| CliError::Tls(format!("HTTP client: {e}")))?;
        Ok(Api { target, client })
    }

    /// `method` on `/v1/admin/<segments>` with `query` and a JSON `body`; the JSON answer, or
    /// the bridge's `error` message as an error.
    async fn call(
        &self,
        method: &str,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let mut all = vec!["v1", "admin"];
        all.extend_from_slice(segments);
        let mut url = self.target.endpoint(&all, false)?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let what = format!("{method} {}", url.path());
        let mut request = match method {
            "POST" => self.client.post(url.clone()),
            _ => self.client.get(url.clone()),
        };
        let mut bearer = http::HeaderValue::from_str(&self.target.bearer())
            .map_err(|_| CliError::Usage("the token is not a valid header value".to_string()))?;
        bearer.set_sensitive(true);
        request = request.header(http::header::AUTHORIZATION, bearer);
        if let Some(body) = body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let mut response = request.send().await.map_err(|e| CliError::Connect {
            url: self.target.base.to_string(),
            reason: error_chain(&e),
        })?;
        let status = response.status().as_u16();
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| CliError::Connect {
            url: self.target.base.to_string(),
            reason: error_chain(&e),
        })? {
            if bytes.len().saturating_add(chunk.len()) > MAX_RESPONSE_BYTES {
                return Err(CliError::Protocol(format!(
                    "{what}: the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        let answer: Option<Value> = serde_json::from_slice(&bytes).ok();
        if (200..300).contains(&status) {
            return answer.ok_or_else(|| {
                CliError::Protocol(format!("{what}: the answer is not JSON (HTTP {status})"))
            });
        }
        let message = match (status, answer.as_ref().and_then(|a| a["error"].as_str())) {
            (401, _) => "the bridge refused the admin token (set --token or WSBRIDGE_ADMIN_TOKEN to server.admin_token)".to_string(),
            (_, Some(m)) => m.to_string(),
            (_, None) => String::from_utf8_lossy(&bytes).trim().chars().take(500).collect(),
        };
        Err(CliError::Http {
            what,
            status,
            message,
        })
    }
}

/// An error with its sources ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Rows under headers, each column as wide as its widest cell (the last one unpadded).
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> Vec<String> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<width$}", width = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out
}

/// A JSON value as a cell: strings bare, null as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table of the objects in `answer[key]`, one row each; `headers` are `|`-separated.
fn table_of(
    answer: &Value,
    key: &str,
    headers: &str,
    row: impl Fn(&Value) -> Vec<String>,
) -> Vec<String> {
    let items = answer[key].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let headers: Vec<&str> = headers.split('|').collect();
    table(&headers, items.iter().map(row).collect())
}

fn upstreams_table(answer: &Value) -> Vec<String> {
    table_of(
        answer,
        "upstreams",
        "NAME|PROVIDER|STATE|SINCE|EVENTS|RECONNECTS|LAST ERROR",
        |u| {
            vec![
                cell(&u["name"]),
                cell(&u["provider"]),
                cell(&u["state"]),
                cell(&u["since"]),
                cell(&u["counters"]["events"]),
                cell(&u["counters"]["reconnects"]),
                cell(&u["last_error"]),
            ]
        },
    )
}

fn webhooks_table(answer: &Value) -> Vec<String> {
    table_of(
        answer,
        "webhooks",
        "NAME|ENABLED|PENDING|IN FLIGHT|DEAD|DELIVERED|LAST ERROR",
        |w| {
            let enabled = match (w["enabled"].as_bool(), w["disabled_reason"].as_str()) {
                (Some(true), _) => "yes".to_string(),
                (_, Some(why)) => format!("no ({why})"),
                _ => "no".to_string(),
            };
            vec![
                cell(&w["name"]),
                enabled,
                cell(&w["pending"]),
                cell(&w["in_flight"]),
                cell(&w["dead"]),
                cell(&w["delivered"]),
                cell(&w["last_error"]),
            ]
        },
    )
}

fn dead_letters_table(answer: &Value) -> Vec<String> {
    table_of(answer, "deliveries", "SEQ|ID|ATTEMPTS|LAST ATTEMPT", |d| {
        let attempts = d["attempts"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let last = attempts.last().map_or("-".to_string(), |a| {
            let outcome = match (a["status"].as_u64(), a["error"].as_str()) {
                (Some(s), _) => format!("HTTP {s}"),
                (None, Some(e)) => e.to_string(),
                (None, None) => "-".to_string(),
            };
            format!("{} {outcome}", cell(&a["at"]))
        });
        vec![
            cell(&d["seq"]),
            cell(&d["id"]),
            attempts.len().to_string(),
            last,
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_ranges_are_cut_into_chunks_without_overflow() {
        assert_eq!(seq_chunks(1, 5, 2), vec![(1, 2), (3, 4), (5, 5)]);
        assert_eq!(seq_chunks(7, 7, 10), vec![(7, 7)]);
        assert_eq!(seq_chunks(3, 2, 10), vec![]);
        assert_eq!(
            seq_chunks(u64::MAX - 2, u64::MAX, 2),
            vec![(u64::MAX - 2, u64::MAX - 1), (u64::MAX, u64::MAX)]
        );
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(0, 0), 100);
    }

    #[test]
    fn tables_align_columns() {
        let lines = table(
            &["NAME", "STATE"],
            vec![
                vec!["voipbin-main".into(), "subscribed".into()],
                vec!["h".into(), "backoff".into()],
            ],
        );
        assert_eq!(
            lines,
            vec![
                "NAME          STATE",
                "voipbin-main  subscribed",
                "h             backoff"
            ]
        );
    }
}
