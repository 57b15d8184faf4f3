//! A raw PostgreSQL protocol client, for messages a driver does not send on its own (a
//! `Flush` in the middle of a batch): a SCRAM-SHA-256 startup, then whole frames out and
//! `(tag, body)` messages in. Every read is bounded.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One session.
pub struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    /// Connects to 127.0.0.1:`port` and authenticates (SCRAM-SHA-256 or none).
    pub async fn connect(port: u16, user: &str, password: &str, db: &str) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        frontend::startup_message([("user", user), ("database", db)], &mut out).unwrap();
        raw.send(&out).await;
        let mut scram = None;
        loop {
            let (tag, body) = raw.recv().await;
            match (
                tag,
                body.get(..4)
                    .map(|c| i32::from_be_bytes(c.try_into().unwrap())),
            ) {
                (b'R', Some(0)) => {}
                (b'R', Some(10)) => {
                    let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    let mut out = BytesMut::new();
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out).unwrap();
                    raw.send(&out).await;
                    scram = Some(s);
                }
                (b'R', Some(11)) => {
                    let s = scram.as_mut().expect("SASL continue after SASL");
                    s.update(&body[4..]).unwrap();
                    let mut out = BytesMut::new();
                    frontend::sasl_response(s.message(), &mut out).unwrap();
                    raw.send(&out).await;
                }
                (b'R', Some(12)) => scram
                    .take()
                    .expect("SASL final")
                    .finish(&body[4..])
                    .unwrap(),
                (b'E', _) => panic!("startup refused: {}", error_text(&body)),
                (b'Z', _) => return raw,
                _ => {}
            }
        }
    }

    /// Writes bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one message (at most 30 s).
    pub async fn recv(&mut self) -> (u8, Vec<u8>) {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if self.buf.len() >= 5 {
                    let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                    if self.buf.len() > len {
                        let frame = self.buf.split_to(len + 1);
                        return (frame[0], frame[5..].to_vec());
                    }
                }
                let n = self.stream.read_buf(&mut self.buf).await.unwrap();
                assert!(n > 0, "the server closed the session");
            }
        })
        .await
        .expect("no answer within 30 s")
    }

    /// Reads messages up to and with the first one tagged `tag`.
    pub async fn until(&mut self, tag: u8) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            let m = self.recv().await;
            let done = m.0 == tag;
            got.push(m);
            if done {
                return got;
            }
        }
    }
}

/// Parse (unnamed statement), Bind (unnamed portal, no parameters, text results), Execute.
pub fn run(sql: &str) -> BytesMut {
    let mut out = bind(sql);
    frontend::execute("", 0, &mut out).unwrap();
    out
}

/// Parse (unnamed statement) and Bind (unnamed portal, no parameters, text results) only.
pub fn bind(sql: &str) -> BytesMut {
    let mut out = BytesMut::new();
    frontend::parse("", sql, std::iter::empty(), &mut out).unwrap();
    out.put_u8(b'B');
    out.put_i32(4 + 1 + 1 + 2 + 2 + 2);
    out.put_slice(b"\0\0");
    out.put_i16(0);
    out.put_i16(0);
    out.put_i16(0);
    out
}

/// `Flush`.
pub fn flush() -> BytesMut {
    let mut out = BytesMut::new();
    frontend::flush(&mut out);
    out
}

/// `Sync`.
pub fn sync() -> BytesMut {
    let mut out = BytesMut::new();
    frontend::sync(&mut out);
    out
}

/// A simple query.
pub fn query(sql: &str) -> BytesMut {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out).unwrap();
    out
}

/// The first column of each `DataRow` among `messages`, as text (`None` for NULL).
pub fn first_values(messages: &[(u8, Vec<u8>)]) -> Vec<Option<String>> {
    messages
        .iter()
        .filter(|(tag, _)| *tag == b'D')
        .map(|(_, body)| {
            let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
            (len >= 0).then(|| String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned())
        })
        .collect()
}

/// The tags of `messages`, as text.
pub fn tags(messages: &[(u8, Vec<u8>)]) -> String {
    messages.iter().map(|(tag, _)| *tag as char).collect()
}

/// An `ErrorResponse` body's SQLSTATE and message.
pub fn error_text(body: &[u8]) -> String {
    let mut code = String::new();
    let mut message = String::new();
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let text = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = text,
            b'M' => message = text,
            _ => {}
        }
    }
    format!("{code} {message}")
}
