//! Who may do what on the admin endpoint: one pure decision per request, no I/O.
//!
//! | request | loopback, no token | token set | beyond loopback, no token |
//! |---|---|---|---|
//! | `GET /metrics`, `/healthz`, `/status` | open | open | open |
//! | `GET /dlq`, `GET /tap` (event payloads) | same-origin | + token | refused |
//! | `POST /dlq/retry`, `/dlq/drop` (writes) | same-origin, JSON | + token | refused |
//!
//! *Same-origin*: a request carrying an `Origin` header other than this endpoint's own
//! (`http://127.0.0.1:PORT`, and `localhost`/`[::1]` on loopback) is refused, and without a
//! token the `Host` must be an IP address or `localhost`, so a web page open on the box can
//! neither post to the endpoint nor read dead letters through a DNS name that points at it.
//! *JSON*: writes are `POST` with `Content-Type: application/json` and a JSON body (`{}`), which
//! a cross-site HTML form cannot send. *Token*: `Authorization: Bearer TOKEN`, compared in
//! constant time; a browser cannot add it to a cross-site request without the endpoint's
//! consent (it never gives one: no CORS).

use std::net::{IpAddr, SocketAddr};

/// What a request touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Counters and health: `/metrics`, `/healthz`, `/status`.
    Open,
    /// Reads that show event payloads: `GET /dlq`, `GET /tap`.
    Payload,
    /// Anything that changes state: `POST /dlq/retry`, `POST /dlq/drop`.
    Write,
}

impl Access {
    /// The kind of request `method path` is.
    pub fn of(method: &str, path: &str) -> Access {
        if path == "/tap" {
            // Payloads, live.
            if method == "GET" {
                Access::Payload
            } else {
                Access::Write
            }
        } else if path == "/dlq" || path.starts_with("/dlq/") {
            if method == "GET" || method == "HEAD" {
                Access::Payload
            } else {
                Access::Write
            }
        } else {
            Access::Open
        }
    }
}

/// The headers (and body) the decision looks at.
#[derive(Debug, Default, Clone, Copy)]
pub struct Facts<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// The `Origin` header, if any.
    pub origin: Option<&'a str>,
    /// The `Host` header, if any.
    pub host: Option<&'a str>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<&'a str>,
    /// The `Authorization` header, if any.
    pub authorization: Option<&'a str>,
    /// The request body.
    pub body: &'a [u8],
}

/// Why a request is refused: the status line and a message saying what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// e.g. `403 Forbidden`.
    pub status: &'static str,
    /// One line for the client.
    pub message: String,
}

impl Refusal {
    fn new(status: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }

    /// Whether the reply should carry `WWW-Authenticate: Bearer`.
    pub fn wants_token(&self) -> bool {
        self.status.starts_with("401")
    }
}

/// The endpoint's policy: its address and its token.
#[derive(Debug, Clone)]
pub struct Policy {
    listen: SocketAddr,
    token: Option<String>,
}

impl Policy {
    /// The policy of an endpoint listening on `listen`, with `token` if one is configured.
    pub fn new(listen: SocketAddr, token: Option<String>) -> Policy {
        Policy { listen, token }
    }

    /// Whether the endpoint listens on loopback only.
    pub fn loopback(&self) -> bool {
        self.listen.ip().is_loopback()
    }

    /// The origins that are this endpoint itself.
    fn own_origin(&self, origin: &str) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        let port = self.listen.port();
        let ip = self.listen.ip();
        let mut own = vec![match ip {
            IpAddr::V4(v4) => format!("http://{v4}:{port}"),
            IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
        }];
        if ip.is_loopback() || ip.is_unspecified() {
            own.push(format!("http://localhost:{port}"));
            own.push(format!("http://127.0.0.1:{port}"));
            own.push(format!("http://[::1]:{port}"));
        }
        own.contains(&origin)
    }

    /// Accepts or refuses one request of kind `access`.
    pub fn decide(&self, access: Access, f: &Facts) -> Result<(), Refusal> {
        if access == Access::Open {
            return Ok(());
        }
        if access == Access::Write && f.method != "POST" {
            return Err(Refusal::new(
                "405 Method Not Allowed",
                "writes are POST with a JSON body, e.g. curl -X POST -H 'Content-Type: application/json' -d '{}' URL",
            ));
        }
        if let Some(o) = f.origin {
            if !self.own_origin(o) {
                return Err(Refusal::new(
                    "403 Forbidden",
                    format!("cross-origin request refused: Origin `{o}` is not this endpoint"),
                ));
            }
        }
        match &self.token {
            Some(token) => match f.authorization.map(str::trim) {
                None => {
                    return Err(Refusal::new(
                        "401 Unauthorized",
                        "this request needs `Authorization: Bearer TOKEN` ([admin] token or token_file)",
                    ))
                }
                Some(a) => {
                    let given = a
                        .split_once(' ')
                        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                        .map(|(_, t)| t.trim());
                    if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
                        return Err(Refusal::new(
                            "401 Unauthorized",
                            "wrong token: send `Authorization: Bearer TOKEN` with the [admin] token",
                        ));
                    }
                }
            },
            None if !self.loopback() => {
                return Err(Refusal::new(
                    "403 Forbidden",
                    format!(
                        "the admin endpoint listens on {} beyond loopback: dead letters and writes need [admin] token or token_file",
                        self.listen
                    ),
                ))
            }
            None => {
                if let Some(h) = f.host {
                    if !address_host(h) {
                        return Err(Refusal::new(
                            "403 Forbidden",
                            format!("Host `{h}` is not an address of this endpoint; use an IP address or localhost"),
                        ));
                    }
                }
            }
        }
        if access == Access::Write {
            let json = f
                .content_type
                .and_then(|c| c.split(';').next())
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
            if !json {
                return Err(Refusal::new(
                    "415 Unsupported Media Type",
                    "writes need `Content-Type: application/json` and a JSON body, e.g. {}",
                ));
            }
            if serde_json::from_slice::<serde_json::Value>(f.body).is_err() {
                return Err(Refusal::new(
                    "400 Bad Request",
                    "the body is not JSON; send e.g. {}",
                ));
            }
        }
        Ok(())
    }
}

/// Whether a `Host` header names an IP address or `localhost` (not a DNS name that a web page
/// could point at this machine).
fn address_host(host: &str) -> bool {
    let h = host.trim();
    let name = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        h.rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map(|(n, _)| n)
            .unwrap_or(h)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// Constant-time comparison (the time taken does not tell how much of a guess was right).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lo() -> Policy {
        Policy::new("127.0.0.1:9464".parse().unwrap(), None)
    }
    fn with_token(listen: &str) -> Policy {
        Policy::new(listen.parse().unwrap(), Some("s3cret".into()))
    }
    fn post<'a>() -> Facts<'a> {
        Facts {
            method: "POST",
            host: Some("127.0.0.1:9464"),
            content_type: Some("application/json"),
            body: b"{}",
            ..Facts::default()
        }
    }
    fn code(r: Result<(), Refusal>) -> u16 {
        match r {
            Ok(()) => 200,
            Err(e) => e.status[..3].parse().unwrap(),
        }
    }

    #[test]
    fn kinds_of_request() {
        assert_eq!(Access::of("GET", "/metrics"), Access::Open);
        assert_eq!(Access::of("GET", "/status"), Access::Open);
        assert_eq!(Access::of("GET", "/dlq"), Access::Payload);
        assert_eq!(Access::of("GET", "/tap"), Access::Payload);
        assert_eq!(Access::of("POST", "/tap"), Access::Write);
        assert_eq!(Access::of("POST", "/dlq/drop"), Access::Write);
        assert_eq!(Access::of("PUT", "/dlq"), Access::Write);
        assert_eq!(Access::of("GET", "/dlqx"), Access::Open);
    }

    #[test]
    fn open_endpoints_are_open_everywhere() {
        for p in [lo(), with_token("0.0.0.0:9464")] {
            let f = Facts {
                method: "GET",
                origin: Some("http://evil.example"),
                host: Some("evil.example"),
                ..Facts::default()
            };
            assert_eq!(code(p.decide(Access::Open, &f)), 200);
        }
    }

    #[test]
    fn same_origin_json_post_on_loopback_is_accepted() {
        assert_eq!(code(lo().decide(Access::Write, &post())), 200);
        for o in [
            "http://127.0.0.1:9464",
            "http://localhost:9464",
            "HTTP://LOCALHOST:9464/",
            "http://[::1]:9464",
        ] {
            let f = Facts {
                origin: Some(o),
                ..post()
            };
            assert_eq!(code(lo().decide(Access::Write, &f)), 200, "{o}");
        }
        let f = Facts {
            content_type: Some("application/json; charset=utf-8"),
            host: Some("localhost:9464"),
            ..post()
        };
        assert_eq!(code(lo().decide(Access::Write, &f)), 200);
        let f = Facts {
            host: None,
            ..post()
        };
        assert_eq!(code(lo().decide(Access::Write, &f)), 200);
    }

    #[test]
    fn cross_origin_is_refused() {
        for o in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:9465",
            "https://127.0.0.1:9464",
            "http://127.0.0.1:9464.evil.example",
        ] {
            let f = Facts {
                origin: Some(o),
                ..post()
            };
            assert_eq!(code(lo().decide(Access::Write, &f)), 403, "{o}");
            let f = Facts {
                method: "GET",
                origin: Some(o),
                ..Facts::default()
            };
            assert_eq!(code(lo().decide(Access::Payload, &f)), 403, "{o}");
        }
        // A token does not make a foreign origin welcome.
        let f = Facts {
            origin: Some("http://evil.example"),
            authorization: Some("Bearer s3cret"),
            ..post()
        };
        assert_eq!(
            code(with_token("127.0.0.1:9464").decide(Access::Write, &f)),
            403
        );
    }

    #[test]
    fn what_a_cross_site_form_can_send_is_refused() {
        for ct in [
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("text/plain"),
            None,
        ] {
            let f = Facts {
                content_type: ct,
                body: b"{}",
                ..post()
            };
            assert_eq!(code(lo().decide(Access::Write, &f)), 415, "{ct:?}");
        }
        let f = Facts {
            body: b"ids=1",
            ..post()
        };
        assert_eq!(code(lo().decide(Access::Write, &f)), 400);
        let f = Facts {
            body: b"",
            ..post()
        };
        assert_eq!(code(lo().decide(Access::Write, &f)), 400);
        let f = Facts {
            method: "GET",
            ..post()
        };
        assert_eq!(code(lo().decide(Access::Write, &f)), 405);
    }

    #[test]
    fn a_dns_name_pointing_here_is_refused_without_a_token() {
        let f = Facts {
            host: Some("rebind.evil.example:9464"),
            ..post()
        };
        assert_eq!(code(lo().decide(Access::Write, &f)), 403);
        let f = Facts {
            method: "GET",
            host: Some("rebind.evil.example:9464"),
            ..Facts::default()
        };
        assert_eq!(code(lo().decide(Access::Payload, &f)), 403);
        for h in ["[::1]:9464", "localhost", "10.0.0.2:9464"] {
            let f = Facts {
                method: "GET",
                host: Some(h),
                ..Facts::default()
            };
            assert_eq!(code(lo().decide(Access::Payload, &f)), 200, "{h}");
        }
    }

    #[test]
    fn a_configured_token_is_required_and_checked() {
        for listen in ["127.0.0.1:9464", "0.0.0.0:9464"] {
            let p = with_token(listen);
            assert_eq!(code(p.decide(Access::Write, &post())), 401, "{listen}");
            let get = Facts {
                method: "GET",
                ..Facts::default()
            };
            assert_eq!(code(p.decide(Access::Payload, &get)), 401, "{listen}");
            for wrong in [
                "Bearer s3cre",
                "Bearer s3cret2",
                "Basic s3cret",
                "s3cret",
                "Bearer",
            ] {
                let f = Facts {
                    authorization: Some(wrong),
                    ..post()
                };
                assert_eq!(code(p.decide(Access::Write, &f)), 401, "{wrong}");
            }
            for right in ["Bearer s3cret", "bearer  s3cret "] {
                let f = Facts {
                    authorization: Some(right),
                    host: Some("pi-kitchen.local:9464"),
                    ..post()
                };
                assert_eq!(code(p.decide(Access::Write, &f)), 200, "{right}");
                let f = Facts {
                    method: "GET",
                    authorization: Some(right),
                    ..Facts::default()
                };
                assert_eq!(code(p.decide(Access::Payload, &f)), 200, "{right}");
            }
            // The token does not excuse a form post.
            let f = Facts {
                authorization: Some("Bearer s3cret"),
                content_type: Some("application/x-www-form-urlencoded"),
                ..post()
            };
            assert_eq!(code(p.decide(Access::Write, &f)), 415);
        }
        assert!(with_token("127.0.0.1:1")
            .decide(Access::Write, &post())
            .unwrap_err()
            .wants_token());
    }

    #[test]
    fn beyond_loopback_without_a_token_payloads_and_writes_are_refused() {
        let p = Policy::new("0.0.0.0:9464".parse().unwrap(), None);
        assert_eq!(code(p.decide(Access::Write, &post())), 403);
        let get = Facts {
            method: "GET",
            ..Facts::default()
        };
        assert_eq!(code(p.decide(Access::Payload, &get)), 403);
        assert_eq!(code(p.decide(Access::Open, &get)), 200);
        let p = Policy::new("192.168.1.5:9464".parse().unwrap(), None);
        assert_eq!(code(p.decide(Access::Write, &post())), 403);
        let p = Policy::new("[::1]:9464".parse().unwrap(), None);
        assert_eq!(code(p.decide(Access::Write, &post())), 200);
    }

    #[test]
    fn constant_time_compare() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
