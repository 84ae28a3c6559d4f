//! The gRPC codec of every Pushwire service: prost's, except that a `PublishRequest` whose
//! `participation_json` is not UTF-8 still decodes. Protobuf `string` fields must be UTF-8 and
//! prost refuses the whole message otherwise, which tonic turns into `INTERNAL` and the end of
//! the `Publish` stream, taking every participation in flight with it. Here the field's bytes
//! are replaced by [`NOT_UTF8`] and the offset of the first invalid byte, so the worker refuses
//! that one participation with a per-message `error`, as any malformed document.

#![warn(clippy::all, missing_docs)]

use std::any::TypeId;
use std::marker::PhantomData;

use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

use super::v1::PublishRequest;
use crate::participation::NOT_UTF8;

/// `PublishRequest.participation_json`'s field number.
const PARTICIPATION_JSON: u32 = 2;

/// prost's codec, with the lenient decoding of `PublishRequest` (see the module).
#[derive(Debug, Clone)]
pub struct PushwireCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for PushwireCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for PushwireCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = PushwireDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        PushwireDecoder(PhantomData)
    }
}

/// Decodes `U` with prost; a `PublishRequest` that fails gets a second chance (see the module).
#[derive(Debug, Clone)]
pub struct PushwireDecoder<U>(PhantomData<U>);

impl<U: Message + Default + 'static> Decoder for PushwireDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if TypeId::of::<U>() != TypeId::of::<PublishRequest>() {
            return U::decode(buf).map(Some).map_err(decode_error);
        }
        // Zero-copy: the message's bytes split off tonic's buffer.
        let bytes = buf.copy_to_bytes(buf.remaining());
        match U::decode(bytes.clone()) {
            Ok(item) => Ok(Some(item)),
            Err(err) => match utf8_replaced(&bytes) {
                Some(fixed) => U::decode(fixed).map(Some).map_err(decode_error),
                None => Err(decode_error(err)),
            },
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

fn decode_error(err: prost::DecodeError) -> Status {
    Status::internal(err.to_string())
}

/// The message with each `participation_json` that is not UTF-8 replaced by [`NOT_UTF8`] and
/// the offset of its first invalid byte; `None` when there is none to replace or the message is
/// malformed otherwise (prost's error then stands).
fn utf8_replaced(message: &[u8]) -> Option<Bytes> {
    let mut rest = message;
    let mut out = BytesMut::with_capacity(message.len());
    let mut replaced = false;
    while rest.has_remaining() {
        let field_start = rest;
        let (tag, wire_type) = decode_key(&mut rest).ok()?;
        match wire_type {
            WireType::Varint => {
                decode_varint(&mut rest).ok()?;
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let n = if wire_type == WireType::SixtyFourBit {
                    8
                } else {
                    4
                };
                if rest.len() < n {
                    return None;
                }
                rest.advance(n);
            }
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut rest).ok()?).ok()?;
                if rest.len() < len {
                    return None;
                }
                let (value, after) = rest.split_at(len);
                if tag == PARTICIPATION_JSON
                    && let Err(e) = std::str::from_utf8(value)
                {
                    let text = format!("{NOT_UTF8}{}", e.valid_up_to());
                    encode_key(tag, WireType::LengthDelimited, &mut out);
                    encode_varint(text.len() as u64, &mut out);
                    out.put_slice(text.as_bytes());
                    replaced = true;
                    rest = after;
                    continue;
                }
                rest = after;
            }
            WireType::StartGroup | WireType::EndGroup => return None,
        }
        let consumed = field_start.len() - rest.len();
        out.put_slice(&field_start[..consumed]);
    }
    replaced.then(|| out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &[u8]) -> Vec<u8> {
        // Encoded as a `bytes` field would be: a client need not be written in Rust.
        let mut buf = Vec::new();
        prost::encoding::string::encode(1, &"accounts/acme".to_owned(), &mut buf);
        encode_key(PARTICIPATION_JSON, WireType::LengthDelimited, &mut buf);
        encode_varint(json.len() as u64, &mut buf);
        buf.extend_from_slice(json);
        prost::encoding::string::encode(3, &"mf".to_owned(), &mut buf);
        prost::encoding::bool::encode(4, &true, &mut buf);
        buf
    }

    #[test]
    fn a_participation_that_is_not_utf8_still_decodes() {
        let raw = request(b"{\"id\": \"caf\xe9\"}");
        assert!(PublishRequest::decode(raw.as_slice()).is_err());
        let fixed = utf8_replaced(&raw).expect("replaced");
        let req = PublishRequest::decode(fixed).unwrap();
        assert_eq!(req.participation_json, format!("{NOT_UTF8}11"));
        // The other fields are kept.
        assert_eq!(req.account, "accounts/acme");
        assert_eq!(req.master_form_id, "mf");
        assert_eq!(req.identified, Some(true));
    }

    #[test]
    fn valid_and_malformed_messages_are_left_alone() {
        assert_eq!(utf8_replaced(&request(b"{}")), None);
        // Cut inside the document: malformed, prost's error stands.
        let raw = request(b"{\"id\": \"caf\xe9\"}");
        assert_eq!(utf8_replaced(&raw[..20]), None);
    }
}
