//! PostgreSQL v3 wire framing: reading whole messages into a buffer without copying their
//! bodies, and building the few messages the balancer writes itself (authentication requests,
//! errors, its own key data). Messages it relays are passed on as the bytes it received, so
//! every field (error details, notices, parameter statuses) reaches the other side unchanged.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol 3.0.
pub const PROTOCOL_3: i32 = 196_608;
/// `SSLRequest` code.
pub const SSL_REQUEST: i32 = 80_877_103;
/// `GSSENCRequest` code.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// `CancelRequest` code.
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// The largest message accepted (PostgreSQL's own limit for most messages is 1 GiB; a
/// balancer has no reason to buffer more than this at once).
pub const MAX_MESSAGE: usize = 64 << 20;
/// The largest startup packet accepted, as PostgreSQL (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP: usize = 10_000;

/// A protocol violation or a closed connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid message.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// One typed message: its type byte and whole frame (type, length and body).
#[derive(Debug, Clone)]
pub struct Message {
    /// Type byte.
    pub tag: u8,
    /// The whole frame as received.
    pub frame: Bytes,
}

impl Message {
    /// The body after type and length.
    pub fn body(&self) -> &[u8] {
        &self.frame[5..]
    }
}

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Startup {
    /// Protocol 3 startup with its parameters, in order.
    Params(Vec<(String, String)>),
    /// `SSLRequest`.
    Ssl,
    /// `GSSENCRequest`.
    GssEnc,
    /// `CancelRequest` with process id and secret.
    Cancel(i32, i32),
}

/// Reads the first packet of a client connection.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Startup, WireError> {
    let len = match r.read_i32().await {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    };
    if !(8..=MAX_STARTUP as i32).contains(&len) {
        return Err(WireError::Protocol(format!("startup packet length {len}")));
    }
    let mut body = vec![0; len as usize - 4];
    r.read_exact(&mut body).await?;
    parse_startup(&body)
}

/// Parses a startup packet body (after its length).
pub fn parse_startup(mut body: &[u8]) -> Result<Startup, WireError> {
    let code = body.get_i32();
    match code {
        SSL_REQUEST => Ok(Startup::Ssl),
        GSSENC_REQUEST => Ok(Startup::GssEnc),
        CANCEL_REQUEST if body.len() >= 8 => Ok(Startup::Cancel(body.get_i32(), body.get_i32())),
        PROTOCOL_3 => {
            let mut params = Vec::new();
            let mut fields = body.split(|b| *b == 0);
            loop {
                let key = fields.next().unwrap_or_default();
                if key.is_empty() {
                    break;
                }
                let value = fields
                    .next()
                    .ok_or_else(|| WireError::Protocol("startup parameter without value".into()))?;
                params.push((utf8(key)?, utf8(value)?));
            }
            Ok(Startup::Params(params))
        }
        other => Err(WireError::Protocol(format!(
            "unsupported protocol version {}.{}",
            other >> 16,
            other & 0xffff
        ))),
    }
}

fn utf8(b: &[u8]) -> Result<String, WireError> {
    String::from_utf8(b.to_vec()).map_err(|_| WireError::Protocol("startup field not UTF-8".into()))
}

/// Takes one whole message off the front of `buf`, if it holds one.
pub fn split_message(buf: &mut BytesMut) -> Result<Option<Message>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_MESSAGE {
        return Err(WireError::Protocol(format!(
            "message '{}' with length {len}",
            buf[0].escape_ascii()
        )));
    }
    let total = len as usize + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let frame = buf.split_to(total).freeze();
    Ok(Some(Message {
        tag: frame[0],
        frame,
    }))
}

/// Whether `buf` holds at least one whole message.
pub fn has_message(buf: &BytesMut) -> bool {
    buf.len() >= 5 && {
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        len >= 4 && buf.len() > len as usize
    }
}

/// Tags of the whole messages at the front of `buf`, in order (a partial one ends the list).
pub fn tags(buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 5 {
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 || rest.len() <= len as usize {
            break;
        }
        out.push(rest[0]);
        rest = &rest[len as usize + 1..];
    }
    out
}

/// Reads until `buf` holds one whole message and returns it.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Message, WireError> {
    loop {
        if let Some(m) = split_message(buf)? {
            return Ok(m);
        }
        if r.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// Appends a message with `tag` and `body`.
pub fn put(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
}

/// A NUL-terminated string field.
pub fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Reads a NUL-terminated string at the front of `b`, advancing past it; its bytes as sent
/// (SQL text is in the client's encoding, which need not be UTF-8).
pub fn take_bytes<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], WireError> {
    let end =
        memchr::memchr(0, b).ok_or_else(|| WireError::Protocol("unterminated string".into()))?;
    let s = &b[..end];
    *b = &b[end + 1..];
    Ok(s)
}

/// Reads a NUL-terminated UTF-8 string at the front of `b`, advancing past it.
pub fn take_cstr<'a>(b: &mut &'a [u8]) -> Result<&'a str, WireError> {
    std::str::from_utf8(take_bytes(b)?).map_err(|_| WireError::Protocol("string not UTF-8".into()))
}

/// Reads a NUL-terminated name (of a statement or portal) at the front of `b`, advancing past
/// it; bytes that are not UTF-8 are replaced, which keeps distinct names distinct in practice.
pub fn take_name(b: &mut &[u8]) -> Result<String, WireError> {
    Ok(String::from_utf8_lossy(take_bytes(b)?).into_owned())
}

/// An `ErrorResponse` (or `NoticeResponse` with tag `N`) with severity, SQLSTATE and message.
pub fn error(out: &mut BytesMut, severity: &str, code: &str, message: &str) {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        cstr(&mut body, value);
    }
    body.push(0);
    put(out, b'E', &body);
}

/// The fields of an `ErrorResponse`: severity, SQLSTATE and message.
pub fn error_fields(body: &[u8]) -> (String, String, String) {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        rest = tail;
        let Ok(value) = take_cstr(&mut rest) else {
            break;
        };
        match field {
            b'S' => severity = value.to_owned(),
            b'C' => code = value.to_owned(),
            b'M' => message = value.to_owned(),
            _ => {}
        }
    }
    (severity, code, message)
}

/// For an `ErrorResponse` body that ends its connection (severity `FATAL` or `PANIC`), the same
/// error as a frame of severity `ERROR`, every other field as the server sent it.
pub fn fatal_as_error(body: &[u8]) -> Option<BytesMut> {
    // Bytes, not text: a message in a client encoding other than UTF-8 is copied as it came.
    let mut fields: Vec<(u8, &[u8])> = Vec::new();
    let mut fatal = false;
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        let value = &tail[..end];
        rest = &tail[end + 1..];
        if matches!(field, b'S' | b'V') {
            fatal |= matches!(value, b"FATAL" | b"PANIC");
            fields.push((field, b"ERROR"));
        } else {
            fields.push((field, value));
        }
    }
    if !fatal {
        return None;
    }
    let mut out = Vec::new();
    for (field, value) in fields {
        out.push(field);
        out.extend_from_slice(value);
        out.push(0);
    }
    out.push(0);
    let mut frame = BytesMut::new();
    put(&mut frame, b'E', &out);
    Some(frame)
}

/// `ReadyForQuery` with a transaction status byte.
pub fn ready(out: &mut BytesMut, status: u8) {
    put(out, b'Z', &[status]);
}

/// A startup packet with `params`.
pub fn startup_packet(params: &[(String, String)]) -> BytesMut {
    let mut body = Vec::new();
    body.extend_from_slice(&PROTOCOL_3.to_be_bytes());
    for (k, v) in params {
        cstr(&mut body, k);
        cstr(&mut body, v);
    }
    body.push(0);
    let mut out = BytesMut::with_capacity(body.len() + 4);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(&body);
    out
}

/// A `CancelRequest` packet.
pub fn cancel_packet(pid: i32, secret: i32) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..].copy_from_slice(&secret.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_lists_whole_messages_only() {
        let mut buf = BytesMut::new();
        put(&mut buf, b'N', b"notice\0");
        error(&mut buf, "FATAL", "57P01", "terminating connection");
        assert_eq!(tags(&buf), vec![b'N', b'E']);
        // A message cut short is not listed, nor is anything after it.
        put(&mut buf, b'Z', b"I");
        let cut = &buf[..buf.len() - 1];
        assert_eq!(tags(cut), vec![b'N', b'E']);
        assert_eq!(tags(&buf), vec![b'N', b'E', b'Z']);
        assert!(tags(&[]).is_empty());
        // A length below 4 is not a message.
        assert!(tags(&[b'E', 0, 0, 0, 2, 0]).is_empty());
    }

    #[test]
    fn a_fatal_error_becomes_the_same_error_of_severity_error() {
        let mut fatal = BytesMut::new();
        error(
            &mut fatal,
            "FATAL",
            "57P01",
            "terminating connection due to administrator command",
        );
        let frame = fatal_as_error(&fatal[5..]).expect("fatal");
        let (severity, code, message) = error_fields(&frame[5..]);
        assert_eq!(
            (severity.as_str(), code.as_str(), message.as_str()),
            (
                "ERROR",
                "57P01",
                "terminating connection due to administrator command"
            )
        );
        let mut expected = BytesMut::new();
        error(
            &mut expected,
            "ERROR",
            "57P01",
            "terminating connection due to administrator command",
        );
        assert_eq!(frame, expected);
        let mut plain = BytesMut::new();
        error(&mut plain, "ERROR", "22012", "division by zero");
        assert!(fatal_as_error(&plain[5..]).is_none());
        // A message in LATIN1 (not UTF-8) is kept byte for byte.
        let latin1 = b"SFATAL\0VFATAL\0C57P01\0Marr\xeat\0\0";
        let frame = fatal_as_error(latin1).expect("fatal");
        assert_eq!(&frame[5..], &b"SERROR\0VERROR\0C57P01\0Marr\xeat\0\0"[..]);
    }

    #[test]
    fn whole_messages_are_split_off_and_partial_ones_wait() {
        let mut out = BytesMut::new();
        put(&mut out, b'Q', b"select 1\0");
        ready(&mut out, b'I');
        let mut buf = BytesMut::from(&out[..7]);
        assert!(split_message(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&out[7..]);
        let q = split_message(&mut buf).unwrap().unwrap();
        assert_eq!((q.tag, q.body()), (b'Q', &b"select 1\0"[..]));
        let z = split_message(&mut buf).unwrap().unwrap();
        assert_eq!((z.tag, z.body()), (b'Z', &b"I"[..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_lengths_are_protocol_violations() {
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 2][..]);
        assert!(matches!(
            split_message(&mut buf),
            Err(WireError::Protocol(_))
        ));
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            split_message(&mut buf),
            Err(WireError::Protocol(_))
        ));
    }

    #[test]
    fn startup_packets_parse() {
        let packet = startup_packet(&[
            ("user".into(), "app".into()),
            ("database".into(), "db".into()),
        ]);
        assert_eq!(
            parse_startup(&packet[4..]).unwrap(),
            Startup::Params(vec![
                ("user".into(), "app".into()),
                ("database".into(), "db".into())
            ])
        );
        let cancel = cancel_packet(42, -7);
        assert_eq!(
            parse_startup(&cancel[4..]).unwrap(),
            Startup::Cancel(42, -7)
        );
        let ssl = [0, 0, 0, 8, 4, 210, 22, 47];
        assert_eq!(parse_startup(&ssl[4..]).unwrap(), Startup::Ssl);
        let v2 = [0, 2, 0, 0];
        assert!(matches!(parse_startup(&v2), Err(WireError::Protocol(m)) if m.contains("2.0")));
    }

    #[test]
    fn error_fields_round_trip() {
        let mut out = BytesMut::new();
        error(&mut out, "FATAL", "28P01", "password authentication failed");
        let m = split_message(&mut out).unwrap().unwrap();
        assert_eq!(
            error_fields(m.body()),
            (
                "FATAL".into(),
                "28P01".into(),
                "password authentication failed".into()
            )
        );
    }
}
