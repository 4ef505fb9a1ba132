//! Data objects (`CKO_DATA`): small records that Tresor keeps in the token because the
//! database cannot be trusted with them.
//!
//! Owns creating, listing and destroying token data objects of application `tresor`, found by
//! their `CKA_LABEL`. Each is a token object, `CKA_PRIVATE` (only a logged-in session sees it)
//! and not modifiable: a record is replaced by creating a new one and destroying the old. What
//! the records mean (creation journals, destruction orders, the audit anchor) belongs to the
//! layers above; this module only stores bytes under a label.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};

use super::session::{OpCtx, OpError, Retry, logged_in};
use super::{Call, Hsm, HsmError};

/// `CKA_APPLICATION` of every data object Tresor creates, so listing skips other software's.
const APPLICATION: &[u8] = b"tresor";

/// A data object as read back from the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataObject {
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_VALUE`.
    pub value: Vec<u8>,
}

fn template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Application(APPLICATION.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// Private objects are invisible to a session that is not logged in: "none found" must then be
/// an error, never an answer (an absent destruction order is harmless, an absent audit anchor
/// would not be).
fn require_login(cx: &OpCtx<'_>) -> Result<(), OpError> {
    if logged_in(cx.session) {
        Ok(())
    } else {
        Err(OpError::Pkcs11(CkError::Pkcs11(
            RvError::UserNotLoggedIn,
            cryptoki::context::Function::FindObjects,
        )))
    }
}

impl Hsm {
    /// Creates a private, non-modifiable token data object. Not retried (a retry after a lost
    /// answer could leave two); readers of several objects of one label must cope with that.
    pub async fn create_data_object(&self, label: String, value: Vec<u8>) -> Result<(), HsmError> {
        self.run(Call::Other, Retry::Never, move |cx| {
            let mut attrs = template(&label);
            attrs.extend([
                Attribute::Private(true),
                Attribute::Modifiable(false),
                Attribute::Copyable(false),
                Attribute::Value(value.clone()),
            ]);
            let _serialised = cx.object_lock();
            cx.session.create_object(&attrs)?;
            Ok(())
        })
        .await
    }

    /// Every Tresor data object whose label starts with `prefix`, in label order.
    pub async fn data_objects(&self, prefix: String) -> Result<Vec<DataObject>, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            require_login(cx)?;
            let handles = cx.session.find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Application(APPLICATION.to_vec()),
            ])?;
            let mut found = Vec::new();
            for handle in handles {
                let mut object = DataObject {
                    label: String::new(),
                    value: Vec::new(),
                };
                for attr in cx
                    .session
                    .get_attributes(handle, &[AttributeType::Label, AttributeType::Value])?
                {
                    match attr {
                        Attribute::Label(l) => {
                            object.label = String::from_utf8_lossy(&l).into_owned()
                        }
                        Attribute::Value(v) => object.value = v,
                        _ => {}
                    }
                }
                if object.label.starts_with(&prefix) {
                    found.push(object);
                }
            }
            found.sort_by(|a, b| a.label.cmp(&b.label));
            Ok(found)
        })
        .await
    }

    /// Destroys every Tresor data object labelled exactly `label`; returns how many there were.
    pub async fn destroy_data_objects(&self, label: String) -> Result<usize, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            require_login(cx)?;
            let _serialised = cx.object_lock();
            let handles = cx.session.find_objects(&template(&label))?;
            for &handle in &handles {
                cx.session.destroy_object(handle)?;
            }
            Ok(handles.len())
        })
        .await
    }
}
